//! DKIM signing of mail that leaves the cluster (RFC 6376, RFC 8463).
//!
//! Keys come from `[[dkim]]` (see `config::DkimKey`). A message is signed with every key of its
//! From: domain: the entries whose `domain` is exactly that domain, or, when there are none, the
//! entries of the nearest parent written as a wildcard (`*.example.org`), with `d=` the parent.
//! Signatures use relaxed/relaxed canonicalization, no `l=`, and over-sign From (it is listed
//! once more than it occurs, so a second From: cannot be added without breaking them).
//!
//! Also here: key generation and the DNS TXT record of a key (`postern dkim keygen`,
//! `postern dns-records`).

use anyhow::{anyhow, Context};
use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::{pem::PemObject, PrivateKeyDer};

use crate::config::{Config, DkimAlgorithm, DkimKey};

/// The header fields signed (in this order); the ones a message lacks are signed as absent, so
/// they cannot be added later either. From comes twice: over-signing.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Content-ID",
    "Content-Description",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// A private key ready to sign.
pub enum PrivateKey {
    Ed25519(Ed25519Key),
    Rsa(RsaKey<Sha256>),
}

impl PrivateKey {
    /// The `p=` value: base64 of the raw Ed25519 public key (RFC 8463) or of the RSA
    /// SubjectPublicKeyInfo (RFC 6376 §3.6.1).
    pub fn public_key_b64(&self) -> String {
        let raw = match self {
            PrivateKey::Ed25519(k) => k.public_key(),
            PrivateKey::Rsa(k) => rsa_spki(&k.public_key()),
        };
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    /// The TXT record's value, e.g. `v=DKIM1; k=ed25519; p=...`.
    pub fn txt_value(&self) -> String {
        let k = match self {
            PrivateKey::Ed25519(_) => "ed25519",
            PrivateKey::Rsa(_) => "rsa",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_key_b64())
    }
}

/// Parses a PEM private key: PKCS#8 (`BEGIN PRIVATE KEY`); for RSA also PKCS#1
/// (`BEGIN RSA PRIVATE KEY`, as opendkim-genkey writes).
pub fn parse_private_key(algorithm: DkimAlgorithm, pem: &[u8]) -> Result<PrivateKey, String> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key ({e})"))?;
    match algorithm {
        DkimAlgorithm::Ed25519 => match der {
            PrivateKeyDer::Pkcs8(d) => Ed25519Key::from_pkcs8_maybe_unchecked_der(d.secret_pkcs8_der())
                .map(PrivateKey::Ed25519)
                .map_err(|_| "not an Ed25519 key in PKCS#8 (algorithm = \"ed25519\")".to_string()),
            _ => Err("an Ed25519 key must be PKCS#8 (`-----BEGIN PRIVATE KEY-----`)".to_string()),
        },
        DkimAlgorithm::RsaSha256 => {
            // ring signs with RSA keys of 2048 to 8192 bits only.
            let key = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|_| "not an RSA private key of 2048 bits or more (algorithm = \"rsa-sha256\")".to_string())?;
            Ok(PrivateKey::Rsa(key))
        }
    }
}

/// Reads and parses the key file of a `[[dkim]]` entry.
pub fn load_key(entry: &DkimKey) -> anyhow::Result<PrivateKey> {
    let pem = std::fs::read(&entry.key).with_context(|| format!("reading {}", entry.key.display()))?;
    parse_private_key(entry.algorithm, &pem).map_err(|e| anyhow!("{}: {e}", entry.key.display()))
}

/// A new key: PKCS#8 PEM text and the parsed key.
pub fn generate(algorithm: DkimAlgorithm, rsa_bits: usize) -> anyhow::Result<(String, PrivateKey)> {
    let der = match algorithm {
        DkimAlgorithm::Ed25519 => Ed25519Key::generate_pkcs8().map_err(|e| anyhow!("{e}"))?,
        DkimAlgorithm::RsaSha256 => {
            let pair = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(rsa_bits).map_err(|e| anyhow!("{e}"))?;
            rsa_pkcs8(pair.private_key())
        }
    };
    let pem = pem_encode("PRIVATE KEY", &der);
    let key = parse_private_key(algorithm, pem.as_bytes()).map_err(|e| anyhow!("{e}"))?;
    Ok((pem, key))
}

/// A zone-file TXT record: `NAME. 3600 IN TXT "..." "..."` on one line, the value cut into
/// character-strings of at most 255 bytes.
pub fn txt_record(name: &str, value: &str) -> String {
    let pieces: Vec<String> =
        value.as_bytes().chunks(255).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
    format!("{name}. 3600 IN TXT {}", pieces.join(" "))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// AlgorithmIdentifier { rsaEncryption, NULL }.
fn rsa_algorithm_id() -> Vec<u8> {
    let oid = [0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    der(0x30, &[&oid[..], &[0x05, 0x00]].concat())
}

/// PKCS#1 RSAPrivateKey → PKCS#8 PrivateKeyInfo.
fn rsa_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    der(0x30, &[&[0x02, 0x01, 0x00][..], &rsa_algorithm_id(), &der(0x04, pkcs1)].concat())
}

/// PKCS#1 RSAPublicKey → SubjectPublicKeyInfo.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    let bits = [&[0u8][..], pkcs1].concat();
    der(0x30, &[rsa_algorithm_id(), der(0x03, &bits)].concat())
}

enum KeySigner {
    Ed25519(DkimSigner<Ed25519Key, Done>),
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
}

struct Loaded {
    entry: DkimKey,
    signer: KeySigner,
}

impl Loaded {
    fn new(entry: DkimKey, key: PrivateKey) -> Loaded {
        fn build<K: SigningKey>(key: K, entry: &DkimKey) -> DkimSigner<K, Done> {
            DkimSigner::from_key(key)
                .domain(entry.domain.clone())
                .selector(entry.selector.clone())
                .headers(SIGNED_HEADERS.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
        }
        let signer = match key {
            PrivateKey::Ed25519(k) => KeySigner::Ed25519(build(k, &entry)),
            PrivateKey::Rsa(k) => KeySigner::Rsa(build(k, &entry)),
        };
        Loaded { entry, signer }
    }

    fn sign(&self, message: &[u8]) -> Result<String, mail_auth::Error> {
        let signature = match &self.signer {
            KeySigner::Ed25519(s) => s.sign(message)?,
            KeySigner::Rsa(s) => s.sign(message)?,
        };
        Ok(signature.to_header())
    }
}

/// The signing table: keys by domain, loaded once at start.
pub struct Signer {
    keys: Vec<Loaded>,
}

impl Signer {
    /// `None` when the config has no `[[dkim]]` keys.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Signer>> {
        if config.dkim.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for entry in &config.dkim {
            keys.push(Loaded::new(entry.clone(), load_key(entry)?));
        }
        Ok(Some(Signer { keys }))
    }

    /// The keys that sign mail from `domain` (lowercase).
    fn keys_for(&self, domain: &str) -> Vec<&Loaded> {
        let exact: Vec<&Loaded> = self.keys.iter().filter(|k| !k.entry.wildcard && k.entry.domain == domain).collect();
        if !exact.is_empty() {
            return exact;
        }
        let mut parent = domain;
        while let Some((_, rest)) = parent.split_once('.') {
            let found: Vec<&Loaded> = self.keys.iter().filter(|k| k.entry.wildcard && k.entry.domain == rest).collect();
            if !found.is_empty() {
                return found;
            }
            parent = rest;
        }
        Vec::new()
    }

    /// `DKIM-Signature:` fields (complete lines, CRLF) for `message`, one per key of its From
    /// domain; empty when no key applies.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let Some(domain) = from_domain(message) else { return Vec::new() };
        let mut out = Vec::new();
        for k in self.keys_for(&domain) {
            match k.sign(message) {
                Ok(field) => out.extend_from_slice(field.as_bytes()),
                Err(e) => tracing::warn!(domain = %domain, selector = %k.entry.selector, "DKIM signing failed: {e}"),
            }
        }
        out
    }
}

/// Every DNS record the cluster needs, in zone-file syntax (`NAME. TTL IN TYPE DATA`, one record
/// a line), each after `;` comment lines saying why (see [`crate::quickstart::zone`]).
pub fn dns_records(config: &Config) -> anyhow::Result<String> {
    use crate::quickstart::zone;
    zone::cluster_zone(config, &Default::default(), zone::Scope::Cluster)
}

/// The domain of the (first) From: address, lowercase; `None` without one.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = match text.find("\r\n\r\n") {
        Some(i) => &text[..i + 2],
        None => match text.find("\n\n") {
            Some(i) => &text[..i + 1],
            None => &text,
        },
    };
    let mut value: Option<String> = None;
    for line in head.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((name, rest)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("from") {
                value = Some(rest.trim().to_string());
            }
        }
    }
    let value = value?;
    let address = match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => value[open + 1..close].to_string(),
        _ => strip_comments(&value).split(',').next().unwrap_or("").trim().to_string(),
    };
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

fn strip_comments(s: &str) -> String {
    let mut depth = 0usize;
    s.chars()
        .filter(|c| match c {
            '(' => {
                depth += 1;
                false
            }
            ')' => {
                depth = depth.saturating_sub(1);
                false
            }
            _ => depth == 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domains() {
        let m = |h: &str| from_domain(format!("Received: x\r\n{h}\r\nSubject: s\r\n\r\nbody\r\n").as_bytes());
        assert_eq!(m("From: Alice <alice@Example.ORG>").as_deref(), Some("example.org"));
        assert_eq!(m("From: alice@example.org (Alice)").as_deref(), Some("example.org"));
        assert_eq!(m("from:\r\n \"A, B\" <a@sub.example.org>").as_deref(), Some("sub.example.org"));
        assert_eq!(m("To: x@y.z"), None);
    }

    fn signer(entries: &[(&str, bool, DkimAlgorithm)]) -> Signer {
        let keys = entries
            .iter()
            .map(|(d, w, a)| {
                let entry = DkimKey {
                    domain: d.to_string(),
                    wildcard: *w,
                    selector: "s1".into(),
                    algorithm: *a,
                    key: "/nonexistent".into(),
                };
                Loaded::new(entry, generate(*a, 2048).unwrap().1)
            })
            .collect();
        Signer { keys }
    }

    #[test]
    fn signs_with_every_key_of_the_domain() {
        let s = signer(&[
            ("example.org", false, DkimAlgorithm::Ed25519),
            ("example.org", false, DkimAlgorithm::RsaSha256),
            ("example.org", true, DkimAlgorithm::Ed25519),
            ("other.org", false, DkimAlgorithm::Ed25519),
        ]);
        let msg = b"Return-Path: <a@example.org>\r\nFrom: a@example.org\r\nTo: b@x.y\r\nSubject: hi\r\n\r\nHello\r\n";
        let out = String::from_utf8(s.sign(msg)).unwrap();
        assert_eq!(out.matches("DKIM-Signature:").count(), 2, "{out}");
        assert!(out.contains("a=ed25519-sha256") && out.contains("a=rsa-sha256"), "{out}");
        assert!(out.contains("c=relaxed/relaxed") && !out.contains("l="), "{out}");
        assert!(out.ends_with("\r\n") && !out.contains("return-path"), "{out}");
        let sub = String::from_utf8(s.sign(&msg.replace_from("a@example.org", "a@x.example.org"))).unwrap();
        assert_eq!(sub.matches("DKIM-Signature:").count(), 1, "{sub}");
        assert!(sub.contains("d=example.org"), "{sub}");
        assert!(s.sign(&msg.replace_from("a@example.org", "a@example.com")).is_empty());
    }

    trait ReplaceFrom {
        fn replace_from(&self, a: &str, b: &str) -> Vec<u8>;
    }
    impl ReplaceFrom for [u8] {
        fn replace_from(&self, a: &str, b: &str) -> Vec<u8> {
            String::from_utf8_lossy(self).replacen(&format!("From: {a}"), &format!("From: {b}"), 1).into_bytes()
        }
    }

    #[test]
    fn generated_keys_round_trip_and_records_split() {
        let (pem, key) = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = parse_private_key(DkimAlgorithm::RsaSha256, pem.as_bytes()).unwrap();
        assert_eq!(again.public_key_b64(), key.public_key_b64());
        let record = txt_record("s._domainkey.example.org", &key.txt_value());
        assert!(record.starts_with("s._domainkey.example.org. 3600 IN TXT \"v=DKIM1; k=rsa; p=MII"), "{record}");
        assert!(record.matches('"').count() >= 4, "over 255 bytes: several strings: {record}");
        assert!(parse_private_key(DkimAlgorithm::Ed25519, pem.as_bytes()).is_err());
        let (pem, _) = generate(DkimAlgorithm::Ed25519, 0).unwrap();
        assert!(parse_private_key(DkimAlgorithm::RsaSha256, pem.as_bytes()).is_err());
    }
}
