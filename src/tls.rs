//! TLS server configuration (rustls with the ring provider): certificates from files, or a
//! self-signed one generated and kept in the data directory so mail flows before real
//! certificates exist.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::HashMap;
use std::sync::RwLock;

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

pub fn load_certified_key(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening certificate {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificate {}", cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificate found (expected PEM)", cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening key {}", key.display()))?,
    ))
    .with_context(|| format!("reading key {}", key.display()))?
    .ok_or_else(|| anyhow!("{}: no private key found (expected PEM)", key.display()))?;
    Ok((certs, key))
}

/// A certificate chain and key ready for rustls, checked to belong together.
pub fn certified_key(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>> {
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).context("unsupported private key type")?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| anyhow!("certificate and key do not match: {e}"))?;
    Ok(Arc::new(ck))
}

pub fn certified_key_from_files(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let (certs, private) = load_certified_key(cert, key)?;
    certified_key(certs, private).with_context(|| format!("{} and {}", cert.display(), key.display()))
}

/// The certificate every TLS listener of a node serves. Replacing it affects new handshakes
/// only: sessions already established keep the certificate they started with.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 validation certificates by host name, served only to `acme-tls/1` clients.
    alpn_challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertStore {
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertStore { current: RwLock::new(initial), alpn_challenges: RwLock::default() })
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().expect("cert lock") = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("cert lock").clone()
    }

    pub fn set_alpn_challenge(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let mut map = self.alpn_challenges.write().expect("cert lock");
        match key {
            Some(k) => map.insert(name.to_ascii_lowercase(), k),
            None => map.remove(&name.to_ascii_lowercase()),
        };
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // RFC 8737 §3: a validation handshake gets the challenge certificate or nothing.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.alpn_challenges.read().expect("cert lock").get(&name).cloned();
        }
        Some(self.current())
    }
}

/// A server config whose certificate comes from `store`; `alpn` lists the protocols to offer.
pub fn server_config(store: Arc<CertStore>, alpn: Vec<Vec<u8>>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// Writes a self-signed certificate for `names` under `dir` unless one is there; returns the
/// (cert, key) paths. The key file is created 0600.
pub fn ensure_self_signed(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("self-signed.pem");
    let key_path = dir.join("self-signed.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let generated = rcgen::generate_simple_self_signed(names.to_vec()).context("generating a certificate")?;
    write_private(&key_path, generated.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, generated.cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// Creates a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}
