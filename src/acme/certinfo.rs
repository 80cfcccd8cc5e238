//! What a certificate says (names, issuer, validity, serial), for renewal decisions and
//! `postern cert status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use x509_parser::prelude::*;

#[derive(Debug, Clone)]
pub struct CertInfo {
    pub names: Vec<String>,
    pub issuer: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Reads the first (leaf) certificate of a PEM chain.
pub fn parse_leaf_pem(pem: &[u8]) -> Result<CertInfo> {
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .ok_or_else(|| anyhow!("no certificate in PEM"))?
        .context("bad PEM")?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| anyhow!("bad certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(CertInfo {
        names,
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
    })
}

impl CertInfo {
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.names.iter().any(|c| c.eq_ignore_ascii_case(n)))
    }

    /// When to renew: `renew_before` ahead of expiry, or at two thirds of the lifetime, whichever
    /// comes first (so short-lived certificates renew in time too).
    pub fn renew_at(&self, renew_before: Duration) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or_default();
        let by_window = self.not_after.checked_sub(renew_before).unwrap_or(UNIX_EPOCH);
        let by_fraction = self.not_before + lifetime * 2 / 3;
        by_window.min(by_fraction)
    }
}

/// `2026-11-21 15:40:00 UTC`
pub fn format_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, 0).map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()
}
