//! The `[srs]` table: the Sender Rewriting Scheme for forwarded mail.

use std::time::Duration;

use super::load::{Ctx, Entry};
use super::model::{Secret, SrsSettings};
use super::values::normalize_domain;

const SRS_KEYS: &[&str] = &["domain", "secret_file", "max_age"];

/// `domains`: the cluster's domains, when `[cluster]` loaded (the SRS domain must be one).
pub(super) fn read_srs(cx: &mut Ctx<'_>, e: &Entry<'_>, domains: Option<&[String]>) -> Option<SrsSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, SRS_KEYS);
    let mut ok = true;
    let domain = match cx.require(&f, "domain") {
        Some(d) => match cx.string(&d).map(normalize_domain) {
            Some(Ok(name)) => match domains {
                Some(list) if !list.contains(&name) => {
                    let message = format!(
                        "`{name}` is not one of the cluster's domains: bounces to SRS addresses must reach \
                         this cluster, so the SRS domain must be in `cluster.domains` (and have MX records \
                         pointing here)"
                    );
                    cx.at(&d, message);
                    None
                }
                _ => Some(name),
            },
            Some(Err(message)) => {
                cx.at(&d, message);
                None
            }
            None => None,
        },
        None => None,
    };
    let secrets = match cx.require(&f, "secret_file") {
        Some(s) => match cx.path(&s) {
            Some(path) => match std::fs::read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    // As postsrsd: one secret per line, empty lines skipped; the first signs.
                    let list: Vec<Secret> =
                        text.split(['\r', '\n']).filter(|l| !l.is_empty()).map(|l| Secret(l.to_string())).collect();
                    if list.is_empty() {
                        cx.at(&s, format!("{} holds no secret; write one per line (the first signs)", path.display()));
                        None
                    } else {
                        Some(list)
                    }
                }
                Err(err) => {
                    cx.at(&s, format!("cannot read {}: {err}", path.display()));
                    None
                }
            },
            None => None,
        },
        None => None,
    };
    let mut max_age = Duration::from_secs(crate::routing::srs::DEFAULT_MAX_AGE_DAYS * 86400);
    if let Some(m) = f.get("max_age") {
        match cx.duration(&m, Duration::from_secs(86400), " (SRS timestamps count days)") {
            Some(d) if d.as_secs() / 86400 < 1024 => max_age = d,
            Some(_) => {
                cx.at(&m, "must be shorter than 1024 days (SRS timestamps wrap around after that)");
                ok = false;
            }
            None => ok = false,
        }
    }
    let (domain, secrets) = (domain?, secrets?);
    ok.then_some(SrsSettings { domain, secrets, max_age })
}

#[cfg(test)]
mod tests {
    use crate::config::load::testing::{base, load, only_error};

    #[test]
    fn srs_section() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("srs.secret");
        std::fs::write(&secret, "first\r\n\nsecond\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let file = |p: &std::path::Path| format!("{:?}", p.display().to_string());
        let c = load(&base(&format!("[srs]\ndomain = \"Example.NET.\"\nsecret_file = {}\n", file(&secret)))).unwrap();
        let s = c.srs.unwrap();
        assert_eq!(s.domain, "example.net");
        assert_eq!(s.secrets.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["first", "second"]);
        assert_eq!(s.max_age.as_secs(), 21 * 86400);
        let c = load(&base(&format!(
            "[srs]\ndomain = \"example.org\"\nsecret_file = {}\nmax_age = \"4d\"\n",
            file(&secret)
        )))
        .unwrap();
        assert_eq!(c.srs.unwrap().max_age.as_secs(), 4 * 86400);
        assert!(load(&base("")).unwrap().srs.is_none());

        let with = |extra: &str| base(&format!("[srs]\nsecret_file = {}\n{extra}", file(&secret)));
        only_error(&with("domain = \"srs.elsewhere.example\"\n"), 9, "srs.domain", "cluster.domains");
        only_error(&with(""), 7, "srs.domain", "required key is missing");
        only_error(&with("domain = \"example.org\"\nmax_age = \"1h\"\n"), 10, "srs.max_age", "at least 1d");
        only_error(&with("domain = \"example.org\"\nmax_age = \"2000d\"\n"), 10, "srs.max_age", "1024 days");
        only_error(&with("domain = \"example.org\"\nhash_length = 5\n"), 10, "srs.hash_length", "");
        let other = |path: &str| base(&format!("[srs]\ndomain = \"example.org\"\nsecret_file = {path:?}\n"));
        only_error(&other("/nonexistent/srs.secret"), 9, "srs.secret_file", "cannot read");
        only_error(&other(&empty.display().to_string()), 9, "srs.secret_file", "holds no secret");
    }
}
