//! Built-in ACME (RFC 8555) with instant-acme: a certificate for the node's hostname (and extra
//! names) at first start, renewed before expiry and swapped into every TLS listener without a
//! restart. State lives in `DATA_DIR/acme/`: `account.json` (0600), `cert.pem`, `key.pem`
//! (0600) and `status.json`, which `postern cert status` reads.

mod certinfo;
pub mod http01;
mod order;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

pub use certinfo::{format_time, parse_leaf_pem, CertInfo};

use crate::config::{AcmeSettings, Node};
use crate::tls::CertStore;

/// What the challenge responders answer: HTTP-01 tokens, and TLS-ALPN-01 certificates (kept in
/// the node's `CertStore`, which serves them to validation handshakes).
#[derive(Clone)]
pub struct Challenges {
    http: Arc<Mutex<HashMap<String, String>>>,
    pub certs: Arc<CertStore>,
}

impl Challenges {
    pub fn new(certs: Arc<CertStore>) -> Self {
        Challenges { http: Arc::default(), certs }
    }

    pub fn http_token(&self, token: &str) -> Option<String> {
        self.http.lock().expect("challenge lock").get(token).cloned()
    }

    fn set_http_token(&self, token: &str, key_authorization: Option<String>) {
        let mut map = self.http.lock().expect("challenge lock");
        match key_authorization {
            Some(k) => map.insert(token.to_string(), k),
            None => map.remove(token),
        };
    }
}

pub fn acme_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("acme")
}

/// The stored certificate, if there is a usable one (`Ok(None)` when there is none at all).
pub fn stored_certificate(data_dir: &Path) -> Result<Option<Arc<rustls::sign::CertifiedKey>>> {
    let dir = acme_dir(data_dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() && !key.exists() {
        return Ok(None);
    }
    Ok(Some(crate::tls::certified_key_from_files(&cert, &key)?))
}

/// Progress the manager records for `postern cert status`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_attempt: Option<u64>,
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
    pub next_check: Option<u64>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn read_status(data_dir: &Path) -> Status {
    std::fs::read(acme_dir(data_dir).join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub struct Manager {
    settings: AcmeSettings,
    names: Vec<String>,
    dir: PathBuf,
    challenges: Challenges,
    status: Status,
}

enum Decision {
    Order(String),
    Wait(Duration),
}

impl Manager {
    pub fn new(settings: AcmeSettings, node: &Node, challenges: Challenges) -> Self {
        let mut names = vec![node.hostname.clone()];
        for n in &settings.names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let dir = acme_dir(&node.data_dir);
        let status = read_status(&node.data_dir);
        Manager { settings, names, dir, challenges, status }
    }

    fn save_status(&self) {
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            let _ = std::fs::create_dir_all(&self.dir);
            let _ = std::fs::write(self.dir.join("status.json"), json);
        }
    }

    /// Whether to order now, and why; or how long the current certificate is good for.
    fn decide(&self) -> Decision {
        let cert = match std::fs::read(self.dir.join("cert.pem")) {
            Ok(c) => c,
            Err(_) => return Decision::Order("no certificate yet".into()),
        };
        let info = match parse_leaf_pem(&cert) {
            Ok(i) => i,
            Err(e) => return Decision::Order(format!("stored certificate unreadable ({e})")),
        };
        if let Err(e) = crate::tls::certified_key_from_files(&self.dir.join("cert.pem"), &self.dir.join("key.pem")) {
            return Decision::Order(format!("stored certificate unusable ({e:#})"));
        }
        if !info.covers(&self.names) {
            return Decision::Order(format!(
                "certificate names {} do not cover {}",
                info.names.join(","),
                self.names.join(",")
            ));
        }
        let renew_at = info.renew_at(self.settings.renew_before);
        match renew_at.duration_since(SystemTime::now()) {
            Ok(wait) => Decision::Wait(wait),
            Err(_) => Decision::Order(format!("due for renewal (expires {})", format_time(info.not_after))),
        }
    }

    /// Runs forever: orders when needed, retries failures with backoff, sleeps otherwise.
    pub async fn run(mut self) {
        let mut backoff = self.settings.retry_initial;
        loop {
            let reason = match self.decide() {
                Decision::Wait(wait) => {
                    let sleep = wait.min(self.settings.check_interval);
                    self.status.next_check = Some(unix(SystemTime::now() + sleep));
                    self.save_status();
                    tokio::time::sleep(sleep).await;
                    continue;
                }
                Decision::Order(reason) => reason,
            };
            tracing::info!("acme ordering names={} reason=\"{reason}\"", self.names.join(","));
            self.status.last_attempt = Some(unix(SystemTime::now()));
            match order::obtain(&self.settings, &self.names, &self.dir, &self.challenges).await {
                Ok((chain, key)) => match self.install(&chain, &key) {
                    Ok(info) => {
                        tracing::info!(
                            "acme certificate installed names={} serial={} not_after=\"{}\" issuer=\"{}\"",
                            info.names.join(","),
                            info.serial,
                            format_time(info.not_after),
                            info.issuer
                        );
                        self.status.last_success = self.status.last_attempt;
                        self.status.last_error = None;
                        backoff = self.settings.retry_initial;
                        continue;
                    }
                    Err(e) => self.failed(format!("{e:#}"), &mut backoff).await,
                },
                Err(e) => self.failed(format!("{e:#}"), &mut backoff).await,
            }
        }
    }

    async fn failed(&mut self, error: String, backoff: &mut Duration) {
        tracing::warn!(
            "acme order failed names={} error=\"{error}\" retry_in={}: still serving the previous certificate",
            self.names.join(","),
            crate::config::format_duration(*backoff)
        );
        self.status.last_error = Some(error);
        self.status.next_check = Some(unix(SystemTime::now() + *backoff));
        self.save_status();
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(self.settings.retry_max);
    }

    /// Stores the new certificate and swaps it in; the files are replaced atomically.
    fn install(&self, chain: &str, key: &str) -> Result<CertInfo> {
        let info = parse_leaf_pem(chain.as_bytes()).context("issued certificate")?;
        let certs = rustls_pemfile::certs(&mut chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let private = rustls_pemfile::private_key(&mut key.as_bytes())?.context("no key")?;
        let certified = crate::tls::certified_key(certs, private)?;
        std::fs::create_dir_all(&self.dir)?;
        let tmp_key = self.dir.join("key.pem.new");
        let tmp_cert = self.dir.join("cert.pem.new");
        crate::tls::write_private(&tmp_key, key.as_bytes())?;
        crate::tls::write_private(&tmp_cert, chain.as_bytes())?;
        std::fs::rename(&tmp_key, self.dir.join("key.pem"))?;
        std::fs::rename(&tmp_cert, self.dir.join("cert.pem"))?;
        self.challenges.certs.set(certified);
        Ok(info)
    }
}

/// A connection to port 443: TLS-ALPN-01 validation handshakes complete and close; nothing else
/// is served on 443 yet.
pub async fn tls_alpn_connection(acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    match tokio::time::timeout(crate::net::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(mut tls)) => {
            let (_, conn) = tls.get_ref();
            let acme = conn.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN);
            tracing::info!("acme tls-alpn-01 handshake address={} validation={acme}", peer.ip());
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
        Ok(Err(e)) => tracing::debug!("https handshake failed address={} error={e}", peer.ip()),
        Err(_) => {}
    }
}

/// `postern cert status`: names, issuer, validity and the next renewal of the node's certificate,
/// read from the data directory (the node need not be running).
pub fn describe_status(config: &crate::config::Config, node: &Node) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "node        {} ({})", node.name, node.hostname);
    let (source, cert_path) = match (&config.acme, config.tls_for(node)) {
        (Some(a), _) => {
            let _ = writeln!(s, "source      acme {} ({})", a.directory, a.challenge.as_str());
            ("acme", acme_dir(&node.data_dir).join("cert.pem"))
        }
        (None, Some(files)) => {
            let _ = writeln!(s, "source      file");
            ("file", files.cert.clone())
        }
        (None, None) => {
            let _ = writeln!(s, "source      self-signed (no [tls] or [acme] configured)");
            ("self-signed", node.data_dir.join("tls/self-signed.pem"))
        }
    };
    let _ = writeln!(s, "certificate {}", cert_path.display());
    match std::fs::read(&cert_path).map_err(anyhow::Error::from).and_then(|pem| parse_leaf_pem(&pem)) {
        Ok(info) => {
            let _ = writeln!(s, "names       {}", info.names.join(", "));
            let _ = writeln!(s, "issuer      {}", info.issuer);
            let _ = writeln!(s, "serial      {}", info.serial);
            let _ = writeln!(s, "valid       {} to {}", format_time(info.not_before), format_time(info.not_after));
            if let Some(a) = &config.acme {
                let _ = writeln!(s, "renewal     from {}", format_time(info.renew_at(a.renew_before)));
            }
        }
        Err(e) => {
            let what = if source == "acme" { "none issued yet" } else { "unreadable" };
            let _ = writeln!(s, "state       {what} ({e:#})");
        }
    }
    if config.acme.is_some() {
        let st = read_status(&node.data_dir);
        let at = |t: Option<u64>| {
            t.map(|t| format_time(SystemTime::UNIX_EPOCH + Duration::from_secs(t))).unwrap_or_else(|| "never".into())
        };
        let _ = writeln!(s, "last order  {}", at(st.last_attempt));
        let _ = writeln!(s, "last issued {}", at(st.last_success));
        if let Some(e) = &st.last_error {
            let _ = writeln!(s, "last error  {e}");
        }
        let _ = writeln!(s, "next check  {}", at(st.next_check));
    }
    s
}
