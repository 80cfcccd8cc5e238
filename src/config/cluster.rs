//! The `[cluster]` table: the domains the cluster is MX for, subaddressing, and the node secret.

use std::path::Path;

use super::load::{Ctx, Entry};
use super::model::{Cluster, Secret};
use super::values::{normalize_domain, Scope};
use toml_edit::Value;

pub(super) fn read_cluster(cx: &mut Ctx<'_>, e: &Entry<'_>) -> (Option<Cluster>, Scope) {
    let mut scope = Scope::unknown();
    let Some(mut f) = cx.table(e) else {
        return (None, scope);
    };
    cx.check_keys(&mut f, CLUSTER_KEYS);
    let domains = cx.require(&f, "domains").and_then(|e| read_domains(cx, &e, &mut scope));
    let separator = f.get("subaddress_separator").map_or(Some(Some('+')), |e| read_separator(cx, &e));
    let secret_file = f.get("secret_file").map_or(Some(None), |e| cx.path(&e).map(Some));
    let secret = match (&secret_file, f.get("secret_file")) {
        (Some(Some(path)), Some(e)) => read_cluster_secret(cx, &e, path),
        _ => Some(None),
    };
    scope.separator = separator.unwrap_or(Some('+'));
    let cluster = match (domains, separator, secret_file, secret) {
        (Some(domains), Some(subaddress_separator), Some(secret_file), Some(secret)) => {
            Some(Cluster { domains, subaddress_separator, secret_file, secret })
        }
        _ => None,
    };
    (cluster, scope)
}

/// The shared node secret: its first line, at least 16 bytes (e.g. `openssl rand -base64 32`).
fn read_cluster_secret(cx: &mut Ctx<'_>, e: &Entry<'_>, path: &Path) -> Option<Option<Secret>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let line = text.lines().next().unwrap_or("").trim();
            if line.len() < 16 {
                cx.at(
                    e,
                    format!(
                        "{} must hold a secret of at least 16 characters on its first line \
                         (e.g. `openssl rand -base64 32`)",
                        path.display()
                    ),
                );
                return None;
            }
            Some(Some(Secret(line.to_string())))
        }
        Err(err) => {
            cx.at(e, format!("cannot read {}: {err}", path.display()));
            None
        }
    }
}

/// An empty string turns subaddressing off; letters, digits and `@` would split real addresses.
fn read_separator(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<Option<char>> {
    let text = cx.string(e)?;
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (None, _) => Some(None),
        // A dot would make `first.last@` deliver to `first@`.
        (Some(c), None) if !(c.is_alphanumeric() || c.is_whitespace() || c.is_control() || c == '@' || c == '.') => {
            Some(Some(c))
        }
        _ => {
            cx.at(e, "expected one punctuation character such as \"+\" or \"-\", or \"\" to turn subaddressing off");
            None
        }
    }
}

/// `None` unless every domain is valid; `scope` gets the valid ones either way.
fn read_domains(cx: &mut Ctx<'_>, e: &Entry<'_>, scope: &mut Scope) -> Option<Vec<String>> {
    if !matches!(e.raw.value(), Some(Value::Array(_))) {
        cx.wrong_type(e, "an array of domain names");
        return None;
    }
    let elements = cx.one_or_many(e);
    if elements.is_empty() {
        cx.at(e, "at least one domain is required");
        return None;
    }
    let mut domains: Vec<String> = Vec::new();
    let mut ok = true;
    for element in &elements {
        let Some(text) = cx.string(element) else {
            ok = false;
            continue;
        };
        match normalize_domain(text) {
            Ok(d) if domains.contains(&d) => {
                cx.at(element, format!("domain `{d}` is listed twice"));
                ok = false;
            }
            Ok(d) => domains.push(d),
            Err(message) => {
                cx.at(element, message);
                scope.refused.push(text.strip_suffix('.').unwrap_or(text).to_lowercase());
                ok = false;
            }
        }
    }
    scope.domains = Some(domains.clone());
    ok.then_some(domains)
}

const CLUSTER_KEYS: &[&str] = &["domains", "subaddress_separator", "secret_file"];
