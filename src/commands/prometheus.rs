//! `keyholder status --prometheus`: the Prometheus text exposition format
//! (version 0.0.4, what node_exporter's textfile collector reads).
//!
//! This command adds what it knows itself: `keyholder_up` (did the daemon
//! answer), `keyholder_build_info{version}` (the daemon's version, or this
//! command's when the daemon did not say), `keyholder_status_code` (the exit
//! code), and from the key list `keyholder_upstream_up`,
//! `keyholder_keys_configured`, `keyholder_keys_armed` and
//! `keyholder_key_armed{key}`. Then it prints the families the daemon sent
//! (format 2 of `status@keyholder`), after checking their names, types and
//! labels: whatever does not fit the format is left out with a comment, so
//! the output always parses. Label values and help texts are escaped.
//!
//! Never: prints a family twice, a sample with a duplicate label set, or a
//! line a parser could read as two.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::status::State;
use crate::protocol::status::{Family, Metrics, StatusReport};

/// What the output is made of.
#[derive(Debug)]
pub struct Input<'a> {
    /// The `status` state (exit code).
    pub state: State,
    /// The `status` summary line.
    pub message: &'a str,
    /// Whether the daemon answered.
    pub daemon_reachable: bool,
    /// Its key list, when it answered one.
    pub report: Option<&'a StatusReport>,
    /// Its counters, when it sent them.
    pub metrics: Option<&'a Metrics>,
}

/// The families this command writes itself (a daemon's are skipped).
const OWN: [&str; 7] = [
    "keyholder_up",
    "keyholder_build_info",
    "keyholder_status_code",
    "keyholder_upstream_up",
    "keyholder_keys_configured",
    "keyholder_keys_armed",
    "keyholder_key_armed",
];

/// The whole text, ending in a newline.
pub fn render(input: &Input<'_>) -> String {
    let mut out = String::new();
    comment(&mut out, &format!("keyholder status: {}", input.message));
    let version = input
        .metrics
        .map_or(env!("CARGO_PKG_VERSION"), |m| m.daemon_version.as_str());
    own(
        &mut out,
        "keyholder_up",
        "gauge",
        "Whether the keyholder daemon answered status@keyholder.",
        &[(&[], u64::from(input.daemon_reachable))],
    );
    own(
        &mut out,
        "keyholder_build_info",
        "gauge",
        "The keyholder daemon's version (this command's when the daemon did not report one).",
        &[(&[("version", version)], 1)],
    );
    own(
        &mut out,
        "keyholder_status_code",
        "gauge",
        "The exit code of keyholder status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        &[(&[], u64::from(input.state.code()))],
    );
    if let Some(report) = input.report {
        let armed = report.keys.iter().filter(|k| k.armed).count();
        own(
            &mut out,
            "keyholder_upstream_up",
            "gauge",
            "Whether the daemon reached its backend (the upstream agent).",
            &[(&[], u64::from(report.upstream_reachable))],
        );
        own(
            &mut out,
            "keyholder_keys_configured",
            "gauge",
            "Keys configured in the daemon.",
            &[(&[], report.keys.len() as u64)],
        );
        own(
            &mut out,
            "keyholder_keys_armed",
            "gauge",
            "Configured keys the backend holds (armed).",
            &[(&[], armed as u64)],
        );
        let per_key: Vec<([(&str, &str); 1], u64)> = report
            .keys
            .iter()
            .map(|k| ([("key", k.name.as_str())], u64::from(k.armed)))
            .collect();
        let samples: Vec<(&[(&str, &str)], u64)> =
            per_key.iter().map(|(l, v)| (&l[..], *v)).collect();
        own(
            &mut out,
            "keyholder_key_armed",
            "gauge",
            "Whether this configured key is armed (1) or not (0).",
            &samples,
        );
    }
    match input.metrics {
        Some(metrics) => {
            let mut seen: HashSet<&str> = OWN.into_iter().collect();
            for family in &metrics.families {
                match check(family) {
                    Ok(()) if seen.insert(family.name.as_str()) => daemon(&mut out, family),
                    Ok(()) => comment(
                        &mut out,
                        &format!("left out: {} (named twice)", family.name),
                    ),
                    Err(why) => comment(&mut out, &format!("left out: {why}")),
                }
            }
        }
        None if input.daemon_reachable => comment(
            &mut out,
            "the daemon sent no counters (it predates them: restart it after an upgrade)",
        ),
        None => {}
    }
    out
}

/// A comment line (never a HELP or TYPE line, never two lines).
fn comment(out: &mut String, text: &str) {
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let _ = writeln!(out, "# {text}");
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn own(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&[(&str, &str)], u64)]) {
    header(out, name, kind, help);
    for (labels, value) in samples {
        sample(out, name, labels.iter().copied(), *value);
    }
}

fn daemon(out: &mut String, family: &Family) {
    header(out, &family.name, &family.kind, &family.help);
    let mut seen = HashSet::new();
    for s in &family.samples {
        let mut set: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        set.sort_unstable();
        if !seen.insert(set) {
            comment(
                out,
                &format!(
                    "left out: a sample of {} repeating a label set",
                    family.name
                ),
            );
            continue;
        }
        if family.kind == "histogram" {
            histogram_sample(out, &family.name, s);
        } else {
            sample(
                out,
                &family.name,
                s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                s.value,
            );
        }
    }
}

/// One sample of a histogram family: a sample with an `le` label is a
/// bucket (`NAME_bucket`); `stat="sum"` is the sum, sent in microseconds
/// and written in seconds (`NAME_sum`); `stat="count"` the count
/// (`NAME_count`).
fn histogram_sample(out: &mut String, name: &str, s: &crate::protocol::status::Sample) {
    let labels = || {
        s.labels
            .iter()
            .filter(|(k, _)| k != "stat")
            .map(|(k, v)| (k.as_str(), v.as_str()))
    };
    match s
        .labels
        .iter()
        .find(|(k, _)| k == "stat")
        .map(|(_, v)| v.as_str())
    {
        Some("sum") => sample(
            out,
            &format!("{name}_sum"),
            labels(),
            crate::protocol::status::seconds(s.value),
        ),
        Some("count") => sample(out, &format!("{name}_count"), labels(), s.value),
        _ => sample(out, &format!("{name}_bucket"), labels(), s.value),
    }
}

fn sample<'a>(
    out: &mut String,
    name: &str,
    labels: impl Iterator<Item = (&'a str, &'a str)>,
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    let mut first = true;
    for (k, v) in labels {
        out.push(if first { '{' } else { ',' });
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    if !first {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Checks what a daemon sent against the format's rules.
fn check(family: &Family) -> Result<(), String> {
    let name = &family.name;
    if !name.starts_with("keyholder_") || !is_metric_name(name) {
        return Err(format!("a family with an invalid name {name:?}"));
    }
    if !["counter", "gauge", "histogram"].contains(&family.kind.as_str()) {
        return Err(format!("{name} (unknown type {:?})", family.kind));
    }
    for s in &family.samples {
        let mut names = HashSet::new();
        for (label, _) in &s.labels {
            if !is_label_name(label) || !names.insert(label.as_str()) {
                return Err(format!("{name} (invalid or repeated label {label:?})"));
            }
        }
    }
    Ok(())
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Label values: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help texts: backslash and newline escaped.
fn escape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::status::{KeyStatus, Sample};

    fn family(name: &str, kind: &str, samples: Vec<Sample>) -> Family {
        Family {
            name: name.into(),
            kind: kind.into(),
            help: "Help with a \\ and a\nnewline.".into(),
            samples,
        }
    }

    fn labelled(labels: &[(&str, &str)], value: u64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            value,
        }
    }

    #[test]
    fn unreachable_daemon_is_up_0_with_build_info() {
        let text = render(&Input {
            state: State::Critical,
            message: "CRITICAL: daemon unreachable at /x: No such file\nor directory",
            daemon_reachable: false,
            report: None,
            metrics: None,
        });
        assert!(text.contains("\nkeyholder_up 0\n"), "{text}");
        assert!(
            text.contains(&format!(
                "keyholder_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("\nkeyholder_status_code 2\n"), "{text}");
        // The message stays one comment line.
        assert!(text.starts_with("# keyholder status: CRITICAL"));
        assert!(text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("keyholder_")));
        assert!(!text.contains("keyholder_key_armed"));
    }

    #[test]
    fn keys_families_and_escaping() {
        let report = StatusReport {
            upstream_reachable: true,
            keys: vec![
                KeyStatus {
                    name: "deploy".into(),
                    fingerprint: "SHA256:x".into(),
                    armed: true,
                },
                KeyStatus {
                    name: "odd\"key\\\nname".into(),
                    fingerprint: "SHA256:y".into(),
                    armed: false,
                },
            ],
        };
        let metrics = Metrics {
            daemon_version: "9.9.9".into(),
            families: vec![
                family(
                    "keyholder_signatures_total",
                    "counter",
                    vec![
                        labelled(&[("key", "deploy"), ("decision", "granted")], 3),
                        labelled(&[("decision", "granted"), ("key", "deploy")], 4),
                    ],
                ),
                family("keyholder_up", "gauge", vec![labelled(&[], 7)]),
                family("keyholder_signatures_total", "counter", vec![]),
                family("not_ours", "gauge", vec![]),
                family("keyholder_x", "summary", vec![]),
                family(
                    "keyholder_y",
                    "gauge",
                    vec![labelled(&[("__name__", "z")], 1)],
                ),
                family(
                    "keyholder_z",
                    "gauge",
                    vec![labelled(&[("a", "1"), ("a", "2")], 1)],
                ),
            ],
        };
        let text = render(&Input {
            state: State::Warning,
            message: "WARNING: 1/2 keys armed",
            daemon_reachable: true,
            report: Some(&report),
            metrics: Some(&metrics),
        });
        assert!(text.contains("keyholder_build_info{version=\"9.9.9\"} 1\n"));
        assert!(text.contains("keyholder_key_armed{key=\"deploy\"} 1\n"));
        assert!(text.contains("keyholder_key_armed{key=\"odd\\\"key\\\\\\nname\"} 0\n"));
        assert!(text.contains("keyholder_keys_armed 1\n"));
        assert!(
            text.contains("# HELP keyholder_signatures_total Help with a \\\\ and a\\nnewline.\n")
        );
        assert!(
            text.contains("keyholder_signatures_total{key=\"deploy\",decision=\"granted\"} 3\n")
        );
        // Same label set in another order: left out.
        assert!(!text.contains("} 4\n"));
        // The daemon cannot override this command's own families, repeat a
        // family, or send bad names, types or labels.
        assert!(!text.contains("keyholder_up 7"));
        assert_eq!(text.matches("# TYPE keyholder_signatures_total").count(), 1);
        for bad in ["not_ours", "keyholder_x ", "keyholder_y", "keyholder_z"] {
            assert!(
                !text.lines().any(|l| l.starts_with(bad)),
                "{bad} printed:\n{text}"
            );
        }
        assert_eq!(text.matches("# left out:").count(), 7, "{text}");
    }

    #[test]
    fn a_histogram_is_written_as_buckets_sum_in_seconds_and_count() {
        let metrics = Metrics {
            daemon_version: "9.9.9".into(),
            families: vec![family(
                "keyholder_h_seconds",
                "histogram",
                vec![
                    labelled(&[("op", "sign"), ("le", "0.001000")], 1),
                    labelled(&[("op", "sign"), ("le", "+Inf")], 2),
                    labelled(&[("op", "sign"), ("stat", "sum")], 1_500_250),
                    labelled(&[("op", "sign"), ("stat", "count")], 2),
                ],
            )],
        };
        let text = render(&Input {
            state: State::Ok,
            message: "OK",
            daemon_reachable: true,
            report: None,
            metrics: Some(&metrics),
        });
        assert!(
            text.contains("# TYPE keyholder_h_seconds histogram\n"),
            "{text}"
        );
        assert!(text.contains("keyholder_h_seconds_bucket{op=\"sign\",le=\"0.001000\"} 1\n"));
        assert!(text.contains("keyholder_h_seconds_bucket{op=\"sign\",le=\"+Inf\"} 2\n"));
        assert!(
            text.contains("keyholder_h_seconds_sum{op=\"sign\"} 1.500250\n"),
            "{text}"
        );
        assert!(text.contains("keyholder_h_seconds_count{op=\"sign\"} 2\n"));
    }

    #[test]
    fn an_older_daemon_gets_a_comment() {
        let report = StatusReport {
            upstream_reachable: false,
            keys: Vec::new(),
        };
        let text = render(&Input {
            state: State::Critical,
            message: "CRITICAL: upstream agent unreachable",
            daemon_reachable: true,
            report: Some(&report),
            metrics: None,
        });
        assert!(text.contains("keyholder_up 1\n"));
        assert!(text.contains("keyholder_upstream_up 0\n"));
        assert!(text.contains("# the daemon sent no counters"));
    }
}
