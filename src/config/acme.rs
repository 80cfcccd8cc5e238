//! The `[acme]` table: which CA, which challenge, which names, and when to renew.

use std::collections::BTreeMap;
use std::time::Duration;

use toml_edit::Value;

use super::load::{Ctx, Entry};
use super::model::{AcmeChallenge, AcmeSettings, Node};

const KEYS: &[&str] = &[
    "directory",
    "contact",
    "challenge",
    "ca_file",
    "names",
    "webroot",
    "eab_kid",
    "eab_hmac_key",
    "renew_before",
    "check_interval",
    "retry_initial",
    "retry_max",
];

const DAY: u64 = 24 * 3600;

pub(super) fn read_acme(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<AcmeSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, KEYS);
    let mut ok = true;
    let directory = cx.require(&f, "directory").and_then(|d| {
        let url = cx.string(&d)?;
        // RFC 8555 §6.1: ACME runs over HTTPS only.
        if !url.starts_with("https://") {
            cx.at(&d, "expected an https:// URL (RFC 8555 requires HTTPS)");
            return None;
        }
        Some(url.to_string())
    });
    let mut contact = Vec::new();
    if let Some(c) = f.get("contact") {
        for item in cx.one_or_many(&c) {
            match cx.string(&item) {
                Some(s) if s.starts_with("mailto:") && s.contains('@') => contact.push(s.to_string()),
                Some(_) => {
                    cx.at(&item, "expected a mailto: URI such as \"mailto:postmaster@example.org\"");
                    ok = false;
                }
                None => ok = false,
            }
        }
    }
    let challenge = match f.get("challenge") {
        None => Some(AcmeChallenge::Http01),
        Some(c) => match cx.string(&c) {
            Some("http-01") => Some(AcmeChallenge::Http01),
            Some("tls-alpn-01") => Some(AcmeChallenge::TlsAlpn01),
            Some(other) => {
                cx.at(&c, format!("expected \"http-01\" or \"tls-alpn-01\", found {other:?}"));
                None
            }
            None => None,
        },
    };
    let ca_file = match f.get("ca_file") {
        None => Some(None),
        Some(c) => cx.path(&c).and_then(|p| {
            if p.is_file() {
                Some(Some(p))
            } else {
                cx.at(&c, format!("CA file {} does not exist", p.display()));
                None
            }
        }),
    };
    let mut names = Vec::new();
    if let Some(n) = f.get("names") {
        if !matches!(n.raw.value(), Some(Value::Array(_))) {
            cx.wrong_type(&n, "an array of host names");
            ok = false;
        } else {
            for item in cx.one_or_many(&n) {
                match cx.string(&item).map(super::values::normalize_domain) {
                    Some(Ok(name)) if name.contains('.') => names.push(name),
                    Some(Ok(name)) => {
                        cx.at(&item, format!("`{name}` is not a fully qualified host name"));
                        ok = false;
                    }
                    Some(Err(message)) => {
                        cx.at(&item, message);
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
    }
    let webroot = match f.get("webroot") {
        None => Some(None),
        Some(w) => cx.path(&w).map(Some),
    };
    let eab = match (f.get("eab_kid"), f.get("eab_hmac_key")) {
        (None, None) => Some(None),
        (Some(k), Some(h)) => match (cx.string(&k), cx.string(&h)) {
            (Some(k), Some(h)) => Some(Some((k.to_string(), h.to_string()))),
            _ => None,
        },
        (Some(one), None) | (None, Some(one)) => {
            cx.at(&one, "eab_kid and eab_hmac_key go together");
            None
        }
    };
    let mut duration = |key: &str, default: Duration, min: Duration| match f.get(key) {
        None => Some(default),
        Some(v) => cx.duration(&v, min, ""),
    };
    let renew_before = duration("renew_before", Duration::from_secs(30 * DAY), Duration::from_secs(60));
    let check_interval = duration("check_interval", Duration::from_secs(12 * 3600), Duration::from_secs(1));
    let retry_initial = duration("retry_initial", Duration::from_secs(60), Duration::from_millis(100));
    let retry_max = duration("retry_max", Duration::from_secs(6 * 3600), Duration::from_millis(100));
    if !ok {
        return None;
    }
    Some(AcmeSettings {
        directory: directory?,
        contact,
        challenge: challenge?,
        ca_file: ca_file?,
        names,
        webroot: webroot?,
        eab: eab?,
        renew_before: renew_before?,
        check_interval: check_interval?,
        retry_initial: retry_initial?,
        retry_max: retry_max?,
    })
}

/// Each node must be able to answer the chosen challenge.
pub(super) fn check_nodes(
    cx: &mut Ctx<'_>,
    e: Option<&Entry<'_>>,
    acme: &AcmeSettings,
    nodes: &BTreeMap<String, Node>,
) {
    for node in nodes.values() {
        let missing = match acme.challenge {
            AcmeChallenge::Http01 if node.listen.http.is_empty() && acme.webroot.is_none() => {
                "listen.http (or acme.webroot)"
            }
            AcmeChallenge::TlsAlpn01 if node.listen.https.is_empty() => "listen.https",
            _ => continue,
        };
        let message =
            format!("challenge {} needs {missing} on node {:?}, which has none", acme.challenge.as_str(), node.name);
        match e {
            Some(e) => cx.at_key(e, message),
            None => cx.error("acme", None, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load::testing::{base, load, only_error};
    use crate::config::AcmeChallenge;

    #[test]
    fn acme_section() {
        let ok = base(
            "[acme]\ndirectory = \"https://ca.example/dir\"\ncontact = \"mailto:pm@example.org\"\n\
             challenge = \"tls-alpn-01\"\nnames = [\"imap.example.org\"]\nrenew_before = \"10d\"\n",
        )
        .replace("[users.", "[nodes.mail.listen]\nhttps = [\"127.0.0.1:0\"]\n[users.");
        let c = load(&ok).unwrap();
        let a = c.acme.unwrap();
        assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
        assert_eq!(a.names, vec!["imap.example.org"]);
        assert_eq!(a.contact, vec!["mailto:pm@example.org"]);
        assert_eq!(a.renew_before.as_secs(), 10 * 86400);
        let acme = |extra: &str| {
            base(&format!("[acme]\ndirectory = \"https://ca.example/dir\"\nwebroot = \"/srv/www\"\n{extra}"))
        };
        only_error(&acme("challenge = \"dns-01\"\n"), 10, "acme.challenge", "\"http-01\" or \"tls-alpn-01\"");
        only_error(&acme("contact = [\"pm@example.org\"]\n"), 10, "acme.contact[0]", "mailto:");
        only_error(&acme("eab_kid = \"k\"\n"), 10, "acme.eab_kid", "go together");
        only_error(&acme("names = [\"imap\"]\n"), 10, "acme.names[0]", "fully qualified");
        only_error(&acme("ca_file = \"/nonexistent.pem\"\n"), 10, "acme.ca_file", "does not exist");
        let http = base("[acme]\ndirectory = \"http://ca.example/dir\"\nwebroot = \"/srv/www\"\n");
        only_error(&http, 8, "acme.directory", "https://");
        let no_port_80 = base("[acme]\ndirectory = \"https://ca.example/dir\"\n");
        only_error(&no_port_80, 7, "acme", "needs listen.http (or acme.webroot) on node \"mail\"");
    }
}
