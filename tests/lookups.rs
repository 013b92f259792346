//! Caller lookups against a real name service that hangs: `nslcd` (Debian's
//! nslcd + libnss-ldapd, the NSS module most LDAP sites run) pointed at an
//! LDAP server on 127.0.0.1 that accepts connections and never answers.
//!
//! The daemon under test runs in its own mount namespace (`unshare -m`),
//! where a test `nsswitch.conf` (`passwd: files ldap`, `group: files ldap`),
//! a test `nslcd.conf` and a private `/run` (for nslcd's socket) are mounted;
//! nslcd itself is started inside it. The machine's own lookups never see
//! LDAP. Without nslcd installed (.ci/run installs it), the tests say
//! SKIPPED loudly.

mod common;

use std::time::Duration;

use common::nslcd::{self, Nslcd};
use common::*;

raw_client_helper!();

macro_rules! require_nslcd {
    () => {
        if !nslcd::installed() {
            eprintln!(
                "\n*** SKIPPED {}:{}: nslcd / libnss-ldapd not installed (.ci/run installs them) ***\n",
                file!(),
                line!()
            );
            return;
        }
    };
}

/// Starts the daemon with `config` in a mount namespace whose user
/// database is `files` then LDAP through nslcd, the LDAP server being
/// `ldap_port`. `local_users`: users whose group lookups nslcd answers
/// at once without asking the server (`nss_initgroups_ignoreusers`).
fn daemon_with_ldap(
    dir: &TempDir,
    config: &str,
    ldap_port: u16,
    local_users: &[&str],
) -> (Daemon, Nslcd) {
    let (nslcd, script) = Nslcd::prepare(dir.path(), ldap_port, local_users).unwrap();
    let daemon = Daemon::start_via(dir, config, &["unshare", "-m", "--", "sh", "-c", &script]);
    assert!(nslcd.pid().is_some(), "nslcd: {}", nslcd.log_text());
    (daemon, nslcd)
}

#[test]
fn a_hanging_directory_times_out_one_caller_while_others_sign() {
    require_root!();
    require_nslcd!();
    let dir = TempDir::new("ldap");
    let agent = Agent::start(&dir);
    agent.add(&keygen(dir.path(), "deploy", "ed25519", ""));
    let before = agent.keys();
    let deployers = TestGroup::create("ld");
    // Both in /etc/passwd and in `deployers`. nslcd answers `local`'s group
    // lookups at once; `hung`'s go to the LDAP server, which never answers.
    let hung = TestUser::create("lh", &[&deployers]);
    let local = TestUser::create("ll", &[&deployers]);
    let config = Daemon::config(
        &dir,
        &agent.socket,
        &format!(
            "[limits]\nlookup_timeout_secs = 1\n\n[keys.deploy]\ngroups = [\"{}\"]\n",
            deployers.name
        ),
    );
    let port = nslcd::silent_ldap_server().unwrap();
    let (daemon, nslcd) = daemon_with_ldap(&dir, &config, port, &["root", &local.name]);

    let blob = pubkey_blob(&dir.join("deploy.pub"));
    let sign = sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0);
    let started = std::env::temp_dir().join(unique("hung-started"));
    let script = [
        Step::Mark(started.clone()),
        Step::Send(sign.clone()),
        Step::Send(vec![11]),
        Step::Send(sign.clone()),
    ];
    let (who, socket) = (hung.as_user(), daemon.socket.clone());
    let hung_client = std::thread::spawn(move || raw_script_as(&who, &socket, &script));
    assert!(wait_for(Duration::from_secs(30), || started.exists()));
    let _ = std::fs::remove_file(&started);

    // While the hung user's lookup hangs (its first request waits for it,
    // then it stays stuck in nslcd for as long as nslcd waits for the
    // server), the local user signs, over and over, and root too.
    for _ in 0..5 {
        let answers = raw_as(&local.as_user(), &daemon.socket, &[vec![11], sign.clone()]);
        assert_eq!(
            listed_blobs(answers[0].as_ref().unwrap()),
            Some(vec![blob.clone()])
        );
        assert_eq!(answers[1].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));
    }
    let mut raw = Raw::connect(&daemon.socket);
    assert_eq!(raw.call(&sign).map(|a| a[0]), Some(SIGN_RESPONSE));

    // The hung user: every request that needs its groups is refused, on a
    // connection that stays open.
    let answers = hung_client.join().unwrap();
    assert_eq!(answers[0], Some(vec![FAILURE]));
    assert_eq!(
        answers[1],
        Some(vec![FAILURE]),
        "a listing is refused, not empty"
    );
    assert_eq!(answers[2], Some(vec![FAILURE]));
    assert_eq!(agent.keys(), before);
    let uid = hung.uid();
    let log = daemon.log_text();
    let refusals = log
        .lines()
        .filter(|l| {
            l.contains(&format!(" uid={uid} "))
                && l.contains("decision=refused")
                && l.contains("reason=user-lookup-timeout")
        })
        .count();
    assert_eq!(refusals, 2, "{log}");
    // One warning for the burst.
    assert_eq!(daemon.log_count("user lookup of uid="), 1, "{log}");
    // The hang was real: nslcd was asked about the hung user, never about
    // the local one's groups from the server.
    assert!(
        nslcd.log_text().contains(&hung.name),
        "nslcd was not asked: {}",
        nslcd.log_text()
    );
    // A uid with no passwd entry hangs too (files has none, so LDAP is
    // asked): refused the same way; the local user is still served.
    let nobody = As::Ids {
        uid: 3_900_000_000 + std::process::id() % 100_000,
        gid: 65534,
    };
    let answers = raw_as(&nobody, &daemon.socket, &[vec![11]]);
    assert_eq!(answers[0], Some(vec![FAILURE]));
    let answers = raw_as(
        &local.as_user(),
        &daemon.socket,
        std::slice::from_ref(&sign),
    );
    assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));
    assert_eq!(agent.keys(), before);
}

#[test]
fn waiting_for_a_lookup_counts_against_the_idle_timeout() {
    require_root!();
    require_nslcd!();
    let dir = TempDir::new("ldapidle");
    let agent = Agent::start(&dir);
    agent.add(&keygen(dir.path(), "deploy", "ed25519", ""));
    let deployers = TestGroup::create("li");
    let hung = TestUser::create("li", &[&deployers]);
    let config = Daemon::config(
        &dir,
        &agent.socket,
        &format!(
            "[limits]\nidle_timeout_secs = 1\nlookup_timeout_secs = 60\n\n             [keys.deploy]\ngroups = [\"{}\"]\n",
            deployers.name
        ),
    );
    let port = nslcd::silent_ldap_server().unwrap();
    let (daemon, _nslcd) = daemon_with_ldap(&dir, &config, port, &["root"]);
    // The lookup would be waited for up to 60 s, but the connection has no
    // answer within its idle timeout: it is closed, not kept open by the wait.
    let answers = raw_as(&hung.as_user(), &daemon.socket, &[vec![11]]);
    assert_eq!(answers[0], None);
    assert!(daemon.wait_log(&format!(
        "closing idle connection of uid={} (waiting for its lookup)",
        hung.uid()
    )));
    // Root, whose lookups nslcd answers at once, is served meanwhile.
    let mut raw = Raw::connect(&daemon.socket);
    assert_eq!(raw.call(&[11]).map(|a| a[0]), Some(IDENTITIES_ANSWER));
}
