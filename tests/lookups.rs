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

/// A site tagged `tag` whose ssh-agent holds the key `deploy`, usable by
/// the group `dep`; the users `users` are members of it; `limits` are
/// its `[limits]` lines. No daemon yet (see [`daemon_with_ldap`]).
fn ldap_site(tag: &str, users: &[&str], limits: &str) -> Site {
    let mut site = Site::builder(tag, Backend::Upstream)
        .group("dep")
        .key(SiteKey::new("deploy", "ed25519").groups(&["dep"]))
        .extra(&format!("[limits]\n{limits}"))
        .no_daemon();
    for user in users {
        site = site.user(user, &["dep"]);
    }
    site.build()
}

/// Starts the site's daemon in a mount namespace whose user database is
/// `files` then LDAP through nslcd, the LDAP server being `ldap_port`.
/// `local_users`: users whose group lookups nslcd answers at once without
/// asking the server (`nss_initgroups_ignoreusers`).
fn daemon_with_ldap(site: &Site, ldap_port: u16, local_users: &[&str]) -> (Daemon, Nslcd) {
    let (nslcd, script) = Nslcd::prepare(site.dir.path(), ldap_port, local_users).unwrap();
    let daemon = site.start_daemon_via(
        &site.config_text(""),
        &["unshare", "-m", "--", "sh", "-c", &script],
        &[],
    );
    assert!(nslcd.pid().is_some(), "nslcd: {}", nslcd.log_text());
    (daemon, nslcd)
}

#[test]
fn a_hanging_directory_times_out_one_caller_while_others_sign() {
    require_root!();
    require_nslcd!();
    // Both in /etc/passwd and in `dep`. nslcd answers `local`'s group
    // lookups at once; `hung`'s go to the LDAP server, which never answers.
    let site = ldap_site("ldap", &["hung", "local"], "lookup_timeout_secs = 1\n");
    let (agent, hung, local) = (&site.agent, site.user("hung"), site.user("local"));
    let before = agent.keys();
    let port = nslcd::silent_ldap_server().unwrap();
    let (daemon, nslcd) = daemon_with_ldap(&site, port, &["root", &local.name]);

    let blob = site.blob("deploy");
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
    let site = ldap_site(
        "ldapidle",
        &["hung"],
        "idle_timeout_secs = 1\nlookup_timeout_secs = 60\n",
    );
    let hung = site.user("hung");
    let port = nslcd::silent_ldap_server().unwrap();
    let (daemon, _nslcd) = daemon_with_ldap(&site, port, &["root"]);
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

/// Whether glibc's nss-systemd module (which reads userdb drop-in records
/// from /run/userdb) is installed.
fn nss_systemd_installed() -> bool {
    ["/lib", "/usr/lib"].iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                std::path::Path::new(&e.path())
                    .join("libnss_systemd.so.2")
                    .exists()
            })
        })
    })
}

/// A uid the user database knows beyond /etc/passwd: a systemd userdb
/// record (`/run/userdb/NAME.user`, read by nss-systemd), standing in for an
/// LDAP/sssd user. The daemon runs in a mount namespace with that record on
/// a private /run and `passwd: files systemd`.
#[test]
fn a_directory_user_is_looked_up_before_the_shared_bucket_refuses_it() {
    require_root!();
    if !nss_systemd_installed() {
        eprintln!("\n*** SKIPPED: libnss-systemd not installed (.ci/run installs it) ***\n");
        return;
    }
    let site = ldap_site("udb", &[], "max_connections_per_user = 2\n");
    let (dir, agent, deployers) = (&site.dir, &site.agent, site.group("dep"));
    let before = agent.keys();
    // The directory user: not in /etc/passwd, primary group `deployers`.
    let dir_uid = 3_900_000_000 + std::process::id() % 100_000 * 8;
    let dir_name = unique("khtdir");
    // Two more uids nobody knows (a user's subordinate uids, say).
    let (nobody1, nobody2, nobody3) = (dir_uid + 1, dir_uid + 2, dir_uid + 3);
    for uid in [dir_uid, nobody1, nobody2, nobody3] {
        assert!(nix::unistd::User::from_uid(uid.into()).unwrap().is_none());
    }
    let records = dir.join("userdb");
    std::fs::create_dir_all(&records).unwrap();
    std::fs::write(
        records.join(format!("{dir_name}.user")),
        format!(
            "{{\"userName\":\"{dir_name}\",\"uid\":{dir_uid},\"gid\":{},\
             \"homeDirectory\":\"/nonexistent\",\"shell\":\"/usr/sbin/nologin\"}}\n",
            deployers.gid()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        format!("{dir_name}.user"),
        records.join(format!("{dir_uid}.user")),
    )
    .unwrap();
    std::fs::write(
        dir.join("nsswitch.conf"),
        "passwd: files systemd\ngroup: files systemd\nshadow: files\nhosts: files\n",
    )
    .unwrap();
    let d = dir.path().display();
    let script = format!(
        "set -e\n\
         mount --bind {d}/nsswitch.conf /etc/nsswitch.conf\n\
         mount -t tmpfs -o mode=0755 kht-run /run\n\
         mkdir /run/userdb\n\
         cp -a {d}/userdb/. /run/userdb/\n\
         getent passwd {dir_uid} >/dev/null || {{ echo 'userdb record not found' >&2; exit 1; }}\n\
         exec \"$0\" \"$@\"\n"
    );
    // Two connections fill the bucket unlisted uids share
    // (`max_connections_per_user = 2`).
    let daemon = site.start_daemon_via(
        &site.config_text(""),
        &["unshare", "-m", "--", "sh", "-c", &script],
        &[],
    );
    let query = [vec![27u8], string(b"query")].concat();
    let release = std::env::temp_dir().join(unique("udb-release"));
    let holders: Vec<_> = [nobody1, nobody2]
        .into_iter()
        .map(|uid| {
            let held = std::env::temp_dir().join(unique("udb-held"));
            let script = [
                Step::Send(query.clone()),
                Step::Mark(held.clone()),
                Step::Wait(release.clone()),
            ];
            let socket = daemon.socket.clone();
            let who = As::Ids { uid, gid: uid };
            let t = std::thread::spawn(move || raw_script_as(&who, &socket, &script));
            assert!(wait_for(Duration::from_secs(30), || held.exists()));
            let _ = std::fs::remove_file(&held);
            t
        })
        .collect();

    // A third unknown uid: refused by the full shared bucket.
    let answers = raw_as(
        &As::Ids {
            uid: nobody3,
            gid: nobody3,
        },
        &daemon.socket,
        std::slice::from_ref(&query),
    );
    assert_eq!(answers, [None], "{}", daemon.log_text());
    assert!(daemon.wait_log(
        "connection limit max_connections_per_user (shared by uids without a passwd entry) \
         reached: closing new connection of uid="
    ));

    // The directory user: looked up, given a bucket of its own, served.
    let blob = site.blob("deploy");
    let sign = sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0);
    let me = As::Ids {
        uid: dir_uid,
        gid: deployers.gid(),
    };
    let answers = raw_as(&me, &daemon.socket, &[vec![11], sign.clone()]);
    assert_eq!(
        listed_blobs(answers[0].as_ref().expect("closed")),
        Some(vec![blob.clone()]),
        "{}",
        daemon.log_text()
    );
    assert_eq!(answers[1].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));
    assert!(
        daemon.wait_log(&format!("sign user={dir_name} uid={dir_uid} pid=")),
        "{}",
        daemon.log_text()
    );
    assert!(
        !daemon
            .log_text()
            .contains(&format!("closing new connection of uid={dir_uid} ")),
        "{}",
        daemon.log_text()
    );
    // Its next connections go straight to its own bucket.
    let answers = raw_as(&me, &daemon.socket, &[sign]);
    assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));

    std::fs::write(&release, "").unwrap();
    for t in holders {
        let answers = t.join().unwrap();
        assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(EXTENSION_RESPONSE));
    }
    let _ = std::fs::remove_file(&release);
    assert_eq!(agent.keys(), before);
}
