//! `keyholder request`, `approve`, `deny`, `grants`, `revoke`: grants over
//! the proxy socket, as the calling user (the daemon knows who asks from
//! the connection; no password, no token).
//!
//! Every refusal is the daemon's one line, printed as `keyholder: …`, exit
//! 1, nothing changed. `request` prints the new grant's id on stdout (and
//! a line for people on stderr); `--wait` then waits until the request is
//! decided: exit 0 when granted, 1 when denied, withdrawn or lapsed.

use std::path::Path;
use std::time::Duration;

use ssh_agent_lib::proto::{Extension, Request, Response};

use super::client::{describe, AgentClient};
use super::ClientConfig;
use crate::error::{Error, Result};
use crate::grants::{Listed, Listing};
use crate::policy::grants::{End, State};
use crate::protocol::grants::{Answer, GrantOp};

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How often `--wait` asks.
const POLL: Duration = Duration::from_secs(1);

/// Sends `op` to the daemon at `socket`: the grant acted on (or the
/// listing's JSON), or the daemon's one-line refusal as the error.
fn call(socket: &Path, op: &GrantOp) -> Result<String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::msg(format!(
            "cannot reach the keyholder daemon on {}: {e}",
            socket.display()
        ))
    };
    let mut client = AgentClient::connect(socket, TIMEOUT).map_err(|e| unreachable(&e))?;
    let response = client
        .call(&Request::Extension(Extension {
            name: op.name().to_owned(),
            details: op.contents().into(),
        }))
        .map_err(|e| unreachable(&e))?;
    let ext = match response {
        Response::ExtensionResponse(ext) if ext.name == op.name() => ext,
        Response::Failure => {
            return Err(Error::msg(format!(
                "the daemon on {} does not support grants (it refused {})",
                socket.display(),
                op.name()
            )))
        }
        other => {
            return Err(Error::msg(format!(
                "unexpected answer to {}: {}",
                op.name(),
                describe(&other)
            )))
        }
    };
    let answer = Answer::decode(ext.details.as_ref())
        .map_err(|e| Error::msg(format!("unexpected answer to {}: {e}", op.name())))?;
    if answer.ok {
        Ok(answer.text)
    } else {
        Err(Error::msg(answer.text.replace(['\n', '\r'], " ")))
    }
}

fn socket(config_path: &Path) -> Result<std::path::PathBuf> {
    let config = ClientConfig::load(config_path)?;
    if let Some(note) = config.note() {
        eprintln!("keyholder: {note}");
    }
    Ok(config.socket())
}

fn parse_grant(text: &str) -> Result<Listed> {
    serde_json::from_str(text).map_err(|e| Error::msg(format!("unexpected answer: {e}")))
}

fn parse_listing(text: &str) -> Result<Listing> {
    serde_json::from_str(text).map_err(|e| Error::msg(format!("unexpected answer: {e}")))
}

/// `keyholder request KEY --for DURATION --reason TEXT [--wait]`.
pub fn run_request(
    config_path: &Path,
    key: &str,
    duration: &str,
    reason: &str,
    wait: bool,
) -> Result<u8> {
    let socket = socket(config_path)?;
    let op = GrantOp::Request {
        key: key.to_owned(),
        duration: duration.to_owned(),
        reason: reason.to_owned(),
    };
    let listed = parse_grant(&call(&socket, &op)?)?;
    let g = &listed.grant;
    say!("{}", g.id);
    match g.state {
        State::Active { until, .. } => {
            eprintln!(
                "keyholder: grant {} for {} is active until {} (break-glass: audited as such)",
                g.id,
                g.key,
                time(until)
            );
            return Ok(0);
        }
        _ => eprintln!(
            "keyholder: grant {} for {} ({}) is pending: {} approval{} needed from {}",
            g.id,
            g.key,
            span(g.secs),
            g.needed,
            if g.needed == 1 { "" } else { "s" },
            who_may_approve(&listed.approver_groups)
        ),
    }
    if !wait {
        return Ok(0);
    }
    loop {
        std::thread::sleep(POLL);
        let listing = parse_listing(&call(
            &socket,
            &GrantOp::List {
                id: Some(g.id.clone()),
            },
        )?)?;
        let Some(now) = listing.grants.into_iter().next() else {
            return Err(Error::msg(format!("grant {} is gone", g.id)));
        };
        match now.grant.state {
            State::Pending { .. } => continue,
            State::Active { until, .. } => {
                eprintln!(
                    "keyholder: grant {} for {} is active until {}",
                    g.id,
                    g.key,
                    time(until)
                );
                return Ok(0);
            }
            State::Ended { how, .. } => {
                let by = now
                    .grant
                    .ended_by
                    .as_ref()
                    .map(|p| format!(" by {}", p.name()))
                    .unwrap_or_default();
                let note = now
                    .grant
                    .note
                    .as_ref()
                    .map(|n| format!(": {}", n.escape_debug()))
                    .unwrap_or_default();
                let what = match how {
                    End::Denied => "denied",
                    End::Lapsed => "lapsed (nobody decided in time)",
                    End::Revoked => "withdrawn",
                    End::Expired => "expired",
                };
                eprintln!("keyholder: grant {} {what}{by}{note}", g.id);
                return Ok(1);
            }
        }
    }
}

/// `keyholder approve ID [--key KEY]`.
pub fn run_approve(config_path: &Path, id: &str, key: Option<&str>) -> Result<u8> {
    let socket = socket(config_path)?;
    let op = GrantOp::Approve {
        id: id.to_owned(),
        key: key.map(str::to_owned),
    };
    let g = parse_grant(&call(&socket, &op)?)?.grant;
    match g.state {
        State::Active { until, .. } => say!(
            "approved {}: {} may use {} until {}",
            g.id,
            g.requester.name(),
            g.key,
            time(until)
        ),
        _ => say!(
            "approved {} ({} of {} approvals; waiting for more)",
            g.id,
            g.approvals.len(),
            g.needed
        ),
    }
    Ok(0)
}

/// `keyholder deny ID [--reason TEXT] [--key KEY]`.
pub fn run_deny(
    config_path: &Path,
    id: &str,
    reason: Option<&str>,
    key: Option<&str>,
) -> Result<u8> {
    let socket = socket(config_path)?;
    let op = GrantOp::Deny {
        id: id.to_owned(),
        key: key.map(str::to_owned),
        note: reason.map(str::to_owned),
    };
    let g = parse_grant(&call(&socket, &op)?)?.grant;
    say!("denied {} ({} for {})", g.id, g.key, g.requester.name());
    Ok(0)
}

/// `keyholder revoke ID [--key KEY]`.
pub fn run_revoke(config_path: &Path, id: &str, key: Option<&str>) -> Result<u8> {
    let socket = socket(config_path)?;
    let op = GrantOp::Revoke {
        id: id.to_owned(),
        key: key.map(str::to_owned),
    };
    let g = parse_grant(&call(&socket, &op)?)?.grant;
    say!("revoked {} ({} for {})", g.id, g.key, g.requester.name());
    Ok(0)
}

/// `keyholder grants [--json]`.
pub fn run_list(config_path: &Path, json: bool) -> Result<u8> {
    let socket = socket(config_path)?;
    let listing = parse_listing(&call(&socket, &GrantOp::List { id: None })?)?;
    if json {
        let mut value = serde_json::to_value(&listing)
            .map_err(|e| Error::msg(format!("cannot encode: {e}")))?;
        if let Some(items) = value.get_mut("grants").and_then(|g| g.as_array_mut()) {
            for (item, listed) in items.iter_mut().zip(&listing.grants) {
                if let Some(obj) = item.as_object_mut() {
                    obj.insert(
                        "approver_members".to_owned(),
                        serde_json::json!(members(&listed.approver_groups)),
                    );
                }
            }
        }
        say!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(0);
    }
    if listing.grants.is_empty() {
        say!("no pending requests and no active grants");
        return Ok(0);
    }
    say!(
        "{:<12}  {:<16}  {:<12}  {:<8}  {:<20}  {:<20}  APPROVERS / REASON",
        "ID",
        "KEY",
        "USER",
        "STATE",
        "FROM",
        "UNTIL"
    );
    for l in &listing.grants {
        let g = &l.grant;
        let (state, from, until) = match g.state {
            State::Pending { lapses_at } => (
                "pending",
                time(g.requested_at),
                format!("(lapses {})", time(lapses_at)),
            ),
            State::Active { from, until } => ("active", time(from), time(until)),
            State::Ended { at, how } => (how.name(), time(g.requested_at), time(at)),
        };
        let approved: Vec<String> = g.approvals.iter().map(|a| a.by.name()).collect();
        let approvers = if g.break_glass {
            "break-glass".to_owned()
        } else if matches!(g.state, State::Pending { .. }) {
            format!(
                "{}/{} approved{}; may approve: {}",
                g.approvals.len(),
                g.needed,
                if approved.is_empty() {
                    String::new()
                } else {
                    format!(" by {}", approved.join(", "))
                },
                who_may_approve(&l.approver_groups)
            )
        } else {
            format!("approved by {}", approved.join(", "))
        };
        say!(
            "{:<12}  {:<16}  {:<12}  {:<8}  {:<20}  {:<20}  {}; reason: {}",
            g.id,
            g.key,
            g.requester.name(),
            state,
            from,
            until,
            approvers,
            g.reason.escape_debug()
        );
    }
    if listing.truncated {
        say!("(more not shown: the list is too long)");
    }
    Ok(0)
}

/// The members of `groups`, as the user database lists them (supplementary
/// members; a group's primary members are not listed by the group file).
fn members(groups: &[String]) -> Vec<String> {
    let mut names: Vec<String> = groups
        .iter()
        .filter_map(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .flat_map(|g| g.mem)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// "deploy-leads (alice, bob)", or "root only".
fn who_may_approve(groups: &[String]) -> String {
    if groups.is_empty() {
        return "root only".to_owned();
    }
    let people = members(groups);
    if people.is_empty() {
        groups.join(", ")
    } else {
        format!("{} ({})", groups.join(", "), people.join(", "))
    }
}

/// `2h`, `30m`, `90s`.
fn span(secs: u64) -> String {
    if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn time(secs: u64) -> String {
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    // Howard Hinnant's days-from-civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_spans() {
        assert_eq!(time(0), "1970-01-01 00:00:00Z");
        assert_eq!(time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(time(1_796_528_400), "2026-12-06 03:40:00Z");
        assert_eq!(span(7200), "2h");
        assert_eq!(span(1800), "30m");
        assert_eq!(span(90), "90s");
    }
}
