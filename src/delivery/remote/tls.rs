//! Certificate verification for outbound TLS.
//!
//! MX delivery is opportunistic (RFC 7435): most MX hosts present certificates that do not
//! match their MX name or chain to no public root, and refusing them would mean falling back
//! to plain text, which is strictly worse. So in opportunistic mode we still run the full
//! WebPKI check, but a failure is *recorded* (for logs and the delivery report) instead of
//! aborting the handshake. Handshake signatures are always checked, so the peer still proves
//! it holds the key of the certificate it sent. In required mode the same check is fatal.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Verifies against the caller's roots; when `lenient`, remembers a failure and lets the
/// handshake go on.
#[derive(Debug)]
pub(super) struct RecordingVerifier {
    /// `None` when there are no roots at all (WebPKI refuses to build a verifier then).
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    lenient: bool,
    failure: Mutex<Option<String>>,
}

impl RecordingVerifier {
    pub(super) fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>, lenient: bool) -> Self {
        let inner = if roots.is_empty() {
            None
        } else {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build().ok()
        };
        RecordingVerifier { inner, provider, lenient, failure: Mutex::new(None) }
    }

    /// Why verification failed, if it did.
    pub(super) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = match &self.inner {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            None => Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        };
        match result {
            Ok(v) => Ok(v),
            Err(e) if self.lenient => {
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls client configuration for one connection, with its verifier (to read the outcome).
pub(super) fn client_config(
    roots: Arc<RootCertStore>,
    lenient: bool,
) -> Result<(Arc<rustls::ClientConfig>, Arc<RecordingVerifier>), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(RecordingVerifier::new(roots, provider.clone(), lenient));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), verifier))
}
