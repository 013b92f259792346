//! The HTTP client of the cluster: a few JSON calls over pooled keep-alive
//! HTTP/1.1 connections (hyper-util's pool), TLS through the OpenSSL the
//! build already links, always verified (against `ca_file` or the system
//! store). `http://` is accepted only for a loopback address.
//!
//! Failover: any address may answer. A connection error, a 5xx, a redirect
//! (a standby during a leader change), a sealed or standby node moves the
//! call to the next address, round after round, until an address gives a
//! definite answer or the call's deadline passes. When every address is
//! sealed or unreachable for [`FAST_FAIL`], the call fails then instead of
//! waiting for its deadline.
//!
//! This module never logs a token, a secret or a request body, never follows
//! a redirect to an address that is not configured, and never buffers more
//! than [`MAX_BODY`] bytes of an answer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_openssl::client::legacy::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use serde_json::Value;
use zeroize::Zeroizing;

/// The largest answer read from the cluster.
pub const MAX_BODY: usize = 1 << 20;
/// When every address has been sealed or unreachable this long, a call
/// fails without waiting for its deadline.
pub const FAST_FAIL: Duration = Duration::from_secs(3);
/// The longest one attempt at one address may take.
const ATTEMPT: Duration = Duration::from_secs(5);
/// How long a TCP connect may take.
const CONNECT: Duration = Duration::from_secs(2);

/// TLS material, already read through the trust check.
#[derive(Default)]
pub struct Tls {
    /// PEM certificates trusted for the cluster (none: the system store).
    pub ca_pem: Option<Vec<u8>>,
    /// The host's TLS client certificate (PEM, chain after the leaf).
    pub client_cert_pem: Option<Vec<u8>>,
    /// Its private key (PEM).
    pub client_key_pem: Option<Zeroizing<Vec<u8>>>,
}

/// A definite answer of the cluster (2xx, or a 4xx that is the cluster's
/// word on the request).
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The parsed JSON body (`Null` for an empty one), or why it is not JSON.
    pub body: Result<Value, String>,
}

impl Reply {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The cluster's own error messages (`errors`), joined, or the status.
    pub fn errors(&self) -> String {
        match &self.body {
            Ok(v) => match v.get("errors").and_then(Value::as_array) {
                Some(list) if !list.is_empty() => list
                    .iter()
                    .map(|e| e.as_str().unwrap_or("?").trim().replace(['\n', '\t'], " "))
                    .collect::<Vec<_>>()
                    .join("; "),
                _ => format!("HTTP {}", self.status),
            },
            Err(e) => format!("HTTP {}: {e}", self.status),
        }
    }
}

/// Why a call got no definite answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Every address that answered is sealed (the others did not answer).
    Sealed,
    /// No address answered (the last error).
    Unreachable(String),
    /// The deadline passed while addresses kept failing (the last reason).
    Timeout(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sealed => f.write_str("the cluster is sealed"),
            Self::Unreachable(e) => write!(f, "no cluster address answered ({e})"),
            Self::Timeout(e) => write!(f, "no usable answer from the cluster in time ({e})"),
        }
    }
}

/// What one attempt at one address gave.
enum Attempt {
    Answer(Reply),
    Sealed,
    Unreachable(String),
    /// Standby, redirect, 5xx, no active node: another address may do.
    Next(String),
}

/// A JSON request body.
pub fn json_body(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// A JSON request body carrying a secret: the buffer is zeroized when the
/// last reference to it is dropped.
pub fn secret_body(value: &impl serde::Serialize) -> Bytes {
    let mut buffer = Zeroizing::new(Vec::with_capacity(4096));
    if serde_json::to_writer(&mut *buffer, value).is_err() {
        buffer.clear();
    }
    Bytes::from_owner(buffer)
}

/// One configured address, as a base URL without the trailing slash.
#[derive(Debug, Clone)]
struct Address {
    base: String,
}

/// The cluster's addresses, a shared connection pool and failover.
pub struct Cluster {
    addresses: Vec<Address>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    namespace: Option<HeaderValue>,
    preferred: AtomicUsize,
    failovers: AtomicU64,
    /// Calls by outcome, in [`OUTCOMES`] order (their latency is in the
    /// daemon's backend request histogram).
    outcomes: [AtomicU64; 5],
}

/// The outcomes calls are counted by.
pub const OUTCOMES: [&str; 5] = ["ok", "refused", "sealed", "unreachable", "timeout"];

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

pub use crate::config::openbao::check_address;

impl Cluster {
    /// A client of these addresses (each checked with [`check_address`]).
    pub fn new(addresses: &[String], tls: &Tls, namespace: Option<&str>) -> Result<Self, String> {
        if addresses.is_empty() {
            return Err("no cluster address configured".into());
        }
        let addresses = addresses
            .iter()
            .map(|a| check_address(a).map(|base| Address { base }))
            .collect::<Result<Vec<_>, _>>()?;
        let ssl = tls_connector(tls)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let https = HttpsConnector::with_connector(http, ssl).map_err(|e| format!("TLS: {e}"))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(https);
        let namespace = match namespace {
            Some(ns) => Some(
                HeaderValue::from_str(ns).map_err(|_| format!("namespace {ns:?} is not valid"))?,
            ),
            None => None,
        };
        Ok(Self {
            addresses,
            client,
            namespace,
            preferred: AtomicUsize::new(0),
            failovers: AtomicU64::new(0),
            outcomes: Default::default(),
        })
    }

    /// Calls by outcome ([`OUTCOMES`]).
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        OUTCOMES
            .iter()
            .zip(&self.outcomes)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// How many times a call was answered by another address than the one
    /// that answered the call before it.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Calls `METHOD /v1/PATH` with an optional token and JSON body, on any
    /// address, until a definite answer or `deadline`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        self.call_from(0, method, path, token, body, deadline).await
    }

    /// Like [`Cluster::call`], starting at the address after the one that
    /// answered last (a login a standby's stale copy refused is asked
    /// again elsewhere).
    pub async fn call_elsewhere(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        self.call_from(1, method, path, token, body, deadline).await
    }

    async fn call_from(
        &self,
        offset: usize,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        let result = self
            .call_counted(offset, method, path, token, body, deadline)
            .await;
        let outcome = match &result {
            Ok(reply) if reply.ok() => 0,
            Ok(_) => 1,
            Err(CallError::Sealed) => 2,
            Err(CallError::Unreachable(_)) => 3,
            Err(CallError::Timeout(_)) => 4,
        };
        if let Some(n) = self.outcomes.get(outcome) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn call_counted(
        &self,
        offset: usize,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        let body = body.unwrap_or_default();
        let n = self.addresses.len();
        let first = (self.preferred.load(Ordering::Relaxed) + offset) % n;
        let mut dead_since: Option<Instant> = None;
        let mut round = 0u32;
        let mut last = String::from("not tried");
        loop {
            let mut all_dead = true;
            let mut any_sealed = false;
            for step in 0..n {
                let index = (first + step) % n;
                let now = Instant::now();
                if now >= deadline {
                    return Err(CallError::Timeout(last));
                }
                let limit = (deadline - now).min(ATTEMPT);
                let base = &self
                    .addresses
                    .get(index)
                    .map(|a| a.base.as_str())
                    .unwrap_or("");
                match self.attempt(base, &method, path, token, &body, limit).await {
                    Attempt::Answer(reply) => {
                        let before = self.preferred.swap(index, Ordering::Relaxed) % n;
                        if before != index {
                            self.failovers.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(reply);
                    }
                    Attempt::Sealed => {
                        any_sealed = true;
                        last = format!("{base}: sealed");
                    }
                    Attempt::Unreachable(e) => last = format!("{base}: {e}"),
                    Attempt::Next(e) => {
                        all_dead = false;
                        last = format!("{base}: {e}");
                    }
                }
            }
            let now = Instant::now();
            if all_dead {
                let since = *dead_since.get_or_insert(now);
                if now.duration_since(since) >= FAST_FAIL {
                    return Err(if any_sealed {
                        CallError::Sealed
                    } else {
                        CallError::Unreachable(last)
                    });
                }
            } else {
                dead_since = None;
            }
            if now >= deadline {
                return Err(if all_dead && any_sealed {
                    CallError::Sealed
                } else {
                    CallError::Timeout(last)
                });
            }
            round = round.saturating_add(1);
            let pause = Duration::from_millis(50 * u64::from(round.min(10)));
            tokio::time::sleep(pause.min(deadline - now)).await;
        }
    }

    async fn attempt(
        &self,
        base: &str,
        method: &Method,
        path: &str,
        token: Option<&str>,
        body: &Bytes,
        limit: Duration,
    ) -> Attempt {
        let uri = format!("{base}/v1/{}", path.trim_start_matches('/'));
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("X-Vault-Request", "true");
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        if let Some(ns) = &self.namespace {
            builder = builder.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(token) = token {
            match HeaderValue::from_str(token) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    builder = builder.header("X-Vault-Token", v);
                }
                Err(_) => return Attempt::Answer(bad_token_reply()),
            }
        }
        let request = match builder.body(Full::new(body.clone())) {
            Ok(r) => r,
            Err(e) => return Attempt::Unreachable(format!("request: {e}")),
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(limit, exchange).await {
            Err(_) => return Attempt::Unreachable(format!("no answer within {limit:?}")),
            Ok(Err(e)) => return Attempt::Unreachable(e),
            Ok(Ok(answer)) => answer,
        };
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(Value::Null)
        } else {
            serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("answer is not JSON: {e}"))
        };
        let reply = Reply { status, body };
        classify(reply)
    }
}

fn bad_token_reply() -> Reply {
    Reply {
        status: 403,
        body: Err("the token is not a valid header value".into()),
    }
}

/// Whether an answer is definite, or another address should be asked.
fn classify(reply: Reply) -> Attempt {
    let text = reply.errors().to_ascii_lowercase();
    let status = reply.status;
    if text.contains("sealed") && (status == 503 || status >= 500 || status == 400) {
        return Attempt::Sealed;
    }
    if (300..400).contains(&status) {
        return Attempt::Next(format!("redirect (HTTP {status}): a standby"));
    }
    if status == 429 || status == 472 || status == 473 {
        return Attempt::Next(format!("standby (HTTP {status})"));
    }
    if status >= 500
        || text.contains("active cluster node not found")
        || text.contains("node not active")
        || text.contains("standby")
    {
        return Attempt::Next(format!("HTTP {status}: {}", reply.errors()));
    }
    Attempt::Answer(reply)
}

/// An error and its sources on one line (hyper's own message alone says
/// little: "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn tls_connector(tls: &Tls) -> Result<openssl::ssl::SslConnectorBuilder, String> {
    let mut ssl =
        SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("TLS: {e}"))?;
    ssl.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| format!("TLS: {e}"))?;
    if let Some(pem) = &tls.ca_pem {
        let certs = X509::stack_from_pem(pem).map_err(|e| format!("ca_file: {e}"))?;
        if certs.is_empty() {
            return Err("ca_file holds no PEM certificate".into());
        }
        let mut store = X509StoreBuilder::new().map_err(|e| format!("TLS: {e}"))?;
        for cert in certs {
            store.add_cert(cert).map_err(|e| format!("ca_file: {e}"))?;
        }
        ssl.set_cert_store(store.build());
    }
    match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => {
            let mut chain = X509::stack_from_pem(cert)
                .map_err(|e| format!("client_cert: {e}"))?
                .into_iter();
            let leaf = chain.next().ok_or("client_cert holds no PEM certificate")?;
            ssl.set_certificate(&leaf)
                .map_err(|e| format!("client_cert: {e}"))?;
            for extra in chain {
                ssl.add_extra_chain_cert(extra)
                    .map_err(|e| format!("client_cert: {e}"))?;
            }
            let key = PKey::private_key_from_pem(key).map_err(|e| format!("client_key: {e}"))?;
            ssl.set_private_key(&key)
                .map_err(|e| format!("client_key: {e}"))?;
            ssl.check_private_key()
                .map_err(|_| "client_key does not match client_cert".to_string())?;
        }
        (None, None) => {}
        _ => return Err("client_cert and client_key go together".into()),
    }
    Ok(ssl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: serde_json::from_str(body).map_err(|e| e.to_string()),
        }
    }

    #[test]
    fn sealed_standby_and_5xx_move_on_4xx_is_definite() {
        assert!(matches!(
            classify(reply(503, r#"{"errors":["Vault is sealed"]}"#)),
            Attempt::Sealed
        ));
        assert!(matches!(classify(reply(307, "")), Attempt::Next(_)));
        assert!(matches!(classify(reply(502, "{}")), Attempt::Next(_)));
        assert!(matches!(
            classify(reply(
                400,
                r#"{"errors":["local node not active but active cluster node not found"]}"#
            )),
            Attempt::Next(_)
        ));
        assert!(matches!(
            classify(reply(403, r#"{"errors":["permission denied"]}"#)),
            Attempt::Answer(_)
        ));
        assert!(matches!(classify(reply(200, "{}")), Attempt::Answer(_)));
    }

    #[tokio::test]
    async fn nothing_listening_fails_fast() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cluster =
            Cluster::new(&[format!("http://127.0.0.1:{port}")], &Tls::default(), None).unwrap();
        let start = Instant::now();
        let err = cluster
            .call(
                Method::GET,
                "sys/health",
                None,
                None,
                start + Duration::from_secs(30),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::Unreachable(_)), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
