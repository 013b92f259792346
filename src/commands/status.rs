//! `keyholder status`: asks the daemon (over the proxy socket, as any user)
//! for its `status@keyholder` report and turns it into a monitoring-plugin
//! answer: a one-line summary, details, and the exit code
//!
//! | code | state    | when |
//! |------|----------|------|
//! | 0    | OK       | every configured key is armed |
//! | 1    | WARNING  | some, not all, are armed |
//! | 2    | CRITICAL | none armed; the daemon unreachable or not answering; the upstream agent unreachable |
//! | 3    | UNKNOWN  | configuration error; an answer that cannot be understood; no keys configured |
//!
//! `--json` prints one object instead (see [`Json`]); its fields are stable.
//! `--prometheus` prints the daemon's counters in the Prometheus text format
//! instead (see [`super::prometheus`]), with the same exit codes.
//! Everything is done within [`TIMEOUT`], so monitoring never hangs.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use ssh_agent_lib::proto::{Extension, Request, Response};
use ssh_encoding::{Decode, Reader};

use super::client::{describe, AgentClient, ClientError};
use super::ClientConfig;
use crate::protocol::status::{self, Answer, KeyStatus, Metrics, StatusReport};

/// The deadline for connecting and for the answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The version of the `--json` document.
pub const JSON_VERSION: u32 = 1;

/// Monitoring-plugin states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// 0
    Ok,
    /// 1
    Warning,
    /// 2
    Critical,
    /// 3
    Unknown,
}

impl State {
    /// The exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Warning => 1,
            Self::Critical => 2,
            Self::Unknown => 3,
        }
    }

    /// The label that starts the summary line.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// The `--json` document.
#[derive(Debug, Serialize)]
pub struct Json {
    /// Version of this document's format ([`JSON_VERSION`]).
    pub version: u32,
    /// `OK`, `WARNING`, `CRITICAL` or `UNKNOWN`.
    pub status: &'static str,
    /// The exit code (0–3).
    pub code: u8,
    /// The summary line, as printed first in text mode.
    pub message: String,
    /// The proxy socket asked (`null` when the configuration failed).
    pub socket: Option<String>,
    /// Whether the daemon answered.
    pub daemon_reachable: bool,
    /// Whether the daemon reached the upstream agent (`null`: unknown, as
    /// when the daemon did not answer).
    pub upstream_reachable: Option<bool>,
    /// Keys armed.
    pub armed: usize,
    /// Keys configured in the daemon.
    pub total: usize,
    /// Each configured key, in configuration order.
    pub keys: Vec<KeyStatus>,
    /// Remarks, such as falling back to the default socket.
    pub notes: Vec<String>,
}

/// What was found.
#[derive(Debug)]
struct Found {
    state: State,
    message: String,
    socket: Option<String>,
    daemon_reachable: bool,
    report: Option<StatusReport>,
    /// The daemon's counters, when asked for and reported.
    metrics: Option<Metrics>,
    notes: Vec<String>,
    /// What the backend says is wrong (a token missing, a key not found).
    backend_notes: Vec<String>,
}

/// Reports status; returns the monitoring-plugin exit code.
pub fn run(config_path: &Path, json: bool) -> u8 {
    let found = evaluate(config_path, false);
    let keys = found
        .report
        .as_ref()
        .map(|r| r.keys.clone())
        .unwrap_or_default();
    let armed = keys.iter().filter(|k| k.armed).count();
    if json {
        let doc = Json {
            version: JSON_VERSION,
            status: found.state.label(),
            code: found.state.code(),
            message: found.message.clone(),
            socket: found.socket.clone(),
            daemon_reachable: found.daemon_reachable,
            upstream_reachable: found.report.as_ref().map(|r| r.upstream_reachable),
            armed,
            total: keys.len(),
            keys,
            notes: found
                .backend_notes
                .iter()
                .chain(&found.notes)
                .cloned()
                .collect(),
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => say!("{text}"),
            Err(e) => {
                say!(
                    "{{\"status\":\"UNKNOWN\",\"code\":3,\"message\":\"cannot encode JSON: {e}\"}}"
                );
                return State::Unknown.code();
            }
        }
    } else {
        say!("{}", found.message);
        let width = keys.iter().map(|k| k.name.len()).max().unwrap_or(0);
        for k in &keys {
            let armed = if k.armed { "armed" } else { "NOT ARMED" };
            say!("{:<width$}  {armed:<9}  {}", k.name, k.fingerprint);
        }
        if found.state != State::Ok && !keys.is_empty() && keys.iter().any(|k| !k.armed) {
            say!("to arm: run `keyholder arm` as root");
        }
        for note in found.backend_notes.iter().chain(&found.notes) {
            say!("note: {note}");
        }
    }
    found.state.code()
}

/// `keyholder status --prometheus`: prints the Prometheus text format and
/// returns the exit code `status` would.
pub fn run_prometheus(config_path: &Path) -> u8 {
    let found = evaluate(config_path, true);
    let text = super::prometheus::render(&super::prometheus::Input {
        state: found.state,
        message: &found.message,
        daemon_reachable: found.daemon_reachable,
        report: found.report.as_ref(),
        metrics: found.metrics.as_ref(),
    });
    say!("{}", text.trim_end_matches('\n'));
    found.state.code()
}

/// Asks the daemon; with `metrics`, for the counters too (format 2).
fn evaluate(config_path: &Path, metrics: bool) -> Found {
    let mut found = Found {
        state: State::Unknown,
        message: String::new(),
        socket: None,
        daemon_reachable: false,
        report: None,
        metrics: None,
        notes: Vec::new(),
        backend_notes: Vec::new(),
    };
    let config = match ClientConfig::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            found.message = format!("UNKNOWN: configuration error: {e}");
            return found;
        }
    };
    if let Some(note) = config.note() {
        found.notes.push(note.to_owned());
    }
    let socket_path = config.socket();
    let socket = socket_path.display().to_string();
    found.socket = Some(socket.clone());

    let mut client = match AgentClient::connect(&socket_path, TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            found.state = State::Critical;
            found.message = format!("CRITICAL: daemon unreachable at {socket}: {e}");
            return found;
        }
    };
    let request = Request::Extension(Extension {
        name: status::NAME.to_owned(),
        details: if metrics {
            status::metrics_request()
        } else {
            status::notes_request()
        }
        .into(),
    });
    let report = match client.call(&request) {
        Ok(Response::ExtensionResponse(ext)) if ext.name == status::NAME => {
            decode_report(ext.details.as_ref())
        }
        Ok(Response::Failure | Response::ExtensionFailure) => Err(format!(
            "the daemon at {socket} refused {} (not keyholder, or an older one?)",
            status::NAME
        )),
        Ok(other) => Err(format!(
            "the daemon at {socket} answered {} to {}",
            describe(&other),
            status::NAME
        )),
        Err(e @ (ClientError::Timeout(_) | ClientError::Io(_) | ClientError::Connect(_))) => {
            found.state = State::Critical;
            found.message = format!("CRITICAL: no answer from the daemon at {socket}: {e}");
            return found;
        }
        Err(e) => Err(format!("the daemon at {socket} sent an {e}")),
    };
    found.daemon_reachable = true;
    let report = match report {
        Ok(Answer {
            report,
            metrics,
            notes,
        }) => {
            found.metrics = metrics;
            found.backend_notes = notes.unwrap_or_default();
            report
        }
        Err(e) => {
            found.message = format!("UNKNOWN: {e}");
            return found;
        }
    };

    let total = report.keys.len();
    let armed = report.keys.iter().filter(|k| k.armed).count();
    let unarmed: Vec<&str> = report
        .keys
        .iter()
        .filter(|k| !k.armed)
        .map(|k| k.name.as_str())
        .collect();
    (found.state, found.message) = if !report.upstream_reachable {
        (
            State::Critical,
            format!(
                "CRITICAL: upstream agent unreachable (the daemon at {socket} cannot reach it); \
                 {armed}/{total} keys armed"
            ),
        )
    } else if total == 0 {
        (
            State::Unknown,
            "UNKNOWN: the daemon has no keys configured".to_owned(),
        )
    } else if armed == total {
        (State::Ok, format!("OK: {armed}/{total} keys armed"))
    } else if armed > 0 {
        (
            State::Warning,
            format!(
                "WARNING: {armed}/{total} keys armed (unarmed: {})",
                unarmed.join(", ")
            ),
        )
    } else {
        (
            State::Critical,
            format!(
                "CRITICAL: 0/{total} keys armed (unarmed: {})",
                unarmed.join(", ")
            ),
        )
    };
    if found.state != State::Ok {
        if let Some(first) = found.backend_notes.first() {
            found.message = format!("{}: {first}", found.message);
        }
    }
    found.report = Some(report);
    found
}

/// Decodes the extension's payload (format 1 or 2); trailing bytes are an
/// error.
fn decode_report(bytes: &[u8]) -> Result<Answer, String> {
    let mut reader = bytes;
    let report = Answer::decode(&mut reader)
        .map_err(|e| format!("cannot decode the daemon's status answer: {e}"))?;
    if !reader.is_finished() {
        return Err(format!(
            "cannot decode the daemon's status answer: {} trailing bytes",
            reader.remaining_len()
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_encoding::Encode;

    #[test]
    fn reports_decode_strictly() {
        let report = StatusReport {
            upstream_reachable: true,
            keys: vec![KeyStatus {
                name: "deploy".into(),
                fingerprint: "SHA256:x".into(),
                armed: false,
            }],
        };
        let mut bytes = Vec::new();
        report.encode(&mut bytes).unwrap();
        assert_eq!(decode_report(&bytes).unwrap().report, report);
        assert_eq!(decode_report(&bytes).unwrap().metrics, None);
        bytes.push(0);
        assert!(decode_report(&bytes).is_err());
        assert!(decode_report(&[0, 0, 0, 2]).is_err());
    }

    #[test]
    fn codes_follow_the_plugin_convention() {
        assert_eq!(
            [State::Ok, State::Warning, State::Critical, State::Unknown].map(State::code),
            [0, 1, 2, 3]
        );
    }
}
