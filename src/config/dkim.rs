//! The `[[dkim]]` signing table: one entry per (domain, selector, key).
//!
//! ```toml
//! [[dkim]]
//! domain = "example.org"         # or "*.example.org": every subdomain (not example.org itself)
//! selector = "2026a"
//! algorithm = "ed25519"          # or "rsa-sha256"
//! key = "/etc/postern/dkim/example.org-2026a.key"   # PKCS#8 PEM (RSA may also be PKCS#1)
//! ```

use std::path::PathBuf;

use super::load::{array_of_tables, Ctx, Entry};
use super::model::{DkimAlgorithm, DkimKey};
use super::values::{normalize_domain, valid_labels};

const DKIM_KEYS: &[&str] = &["domain", "selector", "algorithm", "key"];

pub(super) fn read_dkim(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<Vec<DkimKey>> {
    let tables = array_of_tables(cx, e)?;
    let mut keys = Vec::new();
    let mut ok = true;
    for mut f in tables {
        cx.check_keys(&mut f, DKIM_KEYS);
        let domain = cx.require(&f, "domain").and_then(|d| {
            let text = cx.string(&d)?;
            let (wildcard, name) = match text.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, text),
            };
            match normalize_domain(name) {
                Ok(n) => Some((wildcard, n)),
                Err(message) => {
                    cx.at(&d, message);
                    None
                }
            }
        });
        let selector = cx.require(&f, "selector").and_then(|s| {
            let text = cx.string(&s)?;
            let lower = text.to_ascii_lowercase();
            if valid_labels(&lower) && !lower.ends_with("._domainkey") {
                Some(lower)
            } else {
                cx.at(&s, format!("`{text}` is not a valid selector (DNS labels: letters, digits, `-`, `.`)"));
                None
            }
        });
        let algorithm = cx.require(&f, "algorithm").and_then(|a| match cx.string(&a)? {
            "ed25519" | "ed25519-sha256" => Some(DkimAlgorithm::Ed25519),
            "rsa-sha256" | "rsa" => Some(DkimAlgorithm::RsaSha256),
            other => {
                cx.at(&a, format!("unknown algorithm `{other}`; expected \"ed25519\" or \"rsa-sha256\""));
                None
            }
        });
        let key = cx.require(&f, "key").and_then(|k| {
            let path: PathBuf = cx.path(&k)?;
            match std::fs::read(&path) {
                Ok(pem) => Some((path, pem, k)),
                Err(err) => {
                    cx.at(&k, format!("cannot read the DKIM key {}: {err}", path.display()));
                    None
                }
            }
        });
        match (domain, selector, algorithm, key) {
            (Some((wildcard, domain)), Some(selector), Some(algorithm), Some((path, pem, k))) => {
                if let Err(message) = crate::dkim::parse_private_key(algorithm, &pem) {
                    cx.at(&k, format!("{}: {message}", path.display()));
                    ok = false;
                    continue;
                }
                keys.push(DkimKey { domain, wildcard, selector, algorithm, key: path });
            }
            _ => ok = false,
        }
    }
    ok.then_some(keys)
}
