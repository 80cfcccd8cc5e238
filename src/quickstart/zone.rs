//! The DNS records of a cluster, in zone-file syntax: what `postern dns-records` and
//! `postern quickstart` print. One record a line (`NAME. 3600 IN TYPE DATA`, absolute names), each
//! after `;` comment lines saying why it is needed, so the whole text is a valid zone fragment
//! that a script (or the tests' DNS server) can load as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use crate::config::{Config, DkimAlgorithm, DkimKey, Node, Role};

/// The TTL of every printed record.
pub const TTL: u32 = 3600;

/// The MX preference of a node: primaries first, backups only when no primary answers.
pub fn mx_preference(role: Role) -> u16 {
    match role {
        Role::Primary => 10,
        Role::Backup => 100,
    }
}

/// The SPF record of a cluster domain: only its MX hosts send mail from it.
pub const DOMAIN_SPF: &str = "v=spf1 mx -all";
/// The SPF record of a node's own name (the HELO identity of bounces).
pub const HOST_SPF: &str = "v=spf1 a -all";
/// The DMARC record of a cluster domain.
pub const DMARC: &str = "v=DMARC1; p=quarantine; adkim=r; aspf=r";

/// Which records to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Everything the cluster needs.
    Cluster,
    /// Only what one node adds to a cluster that is already published: its MX records, its
    /// addresses and reverse names, the SPF record of its name. (A backup signs nothing and
    /// shares the domains' SPF and DMARC records, which name no host.)
    Node(&'a str),
}

/// A zone-file line for `name` (without trailing dot).
fn record(out: &mut String, name: &str, rtype: &str, data: &str) {
    let _ = writeln!(out, "{name}. {TTL} IN {rtype} {data}");
}

fn comment(out: &mut String, text: &str) {
    let _ = writeln!(out, "; {text}");
}

/// The reverse name of an address (`7.2.0.192.in-addr.arpa`), without trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    let name = hickory_resolver::proto::rr::Name::from(ip).to_ascii();
    name.trim_end_matches('.').to_string()
}

/// The name a DKIM key's record is published at: `SELECTOR._domainkey.DOMAIN`.
pub fn dkim_name(entry: &DkimKey) -> String {
    format!("{}._domainkey.{}", entry.selector, entry.domain)
}

/// The DKIM record of one key, after its comment.
pub fn dkim_record(out: &mut String, name: &str, algorithm: DkimAlgorithm, txt_value: &str, why: &str) {
    let rfc = if algorithm == DkimAlgorithm::Ed25519 { ", RFC 8463" } else { "" };
    comment(out, &format!("DKIM (RFC 6376{rfc}): {why}"));
    let _ = writeln!(out, "{}", crate::dkim::txt_record(name, txt_value));
}

/// The address records of a node and the reverse records of those addresses; a note instead when
/// its addresses are not known.
fn address_records(out: &mut String, node: &Node, addresses: &[IpAddr]) {
    let host = &node.hostname;
    if addresses.is_empty() {
        comment(
            out,
            &format!(
                "(also needed, not printed: A/AAAA records of {host}, and PTR records of those addresses \
                 pointing back at {host})"
            ),
        );
        return;
    }
    for ip in addresses {
        let rtype = if ip.is_ipv4() { "A" } else { "AAAA" };
        comment(out, &format!("{rtype}: the address of node `{}`; MX records and clients find it by name", node.name));
        record(out, host, rtype, &ip.to_string());
    }
    for ip in addresses {
        comment(
            out,
            &format!(
                "PTR (reverse DNS) of {ip}: set it where the address comes from (your hosting or internet \
                 provider's panel), not in your own zone; many receivers refuse mail from an address whose \
                 reverse name does not lead back to it"
            ),
        );
        record(out, &reverse_name(*ip), "PTR", &format!("{host}."));
    }
}

/// Every record of `scope`, with `addresses` (by node name) for the A/AAAA and PTR records; nodes
/// without known addresses get a note instead. Fails when a DKIM key file cannot be read.
pub fn cluster_zone(
    config: &Config,
    addresses: &BTreeMap<String, Vec<IpAddr>>,
    scope: Scope<'_>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let nodes: Vec<&Node> = match scope {
        Scope::Cluster => config.nodes.values().collect(),
        Scope::Node(name) => match config.nodes.get(name) {
            Some(n) => vec![n],
            None => anyhow::bail!("no node named {name:?} in {}", config.path.display()),
        },
    };
    match scope {
        Scope::Cluster => {
            comment(&mut out, &format!("DNS records for the Postern cluster of {}", config.path.display()))
        }
        Scope::Node(name) => comment(
            &mut out,
            &format!(
                "DNS records that node `{name}` adds to the Postern cluster of {} (the records the cluster \
                 already publishes stay as they are)",
                config.path.display()
            ),
        ),
    }
    comment(&mut out, &format!("(zone-file syntax; names are absolute, TTL {TTL})"));
    for domain in &config.cluster.domains {
        let _ = writeln!(out, "\n; ---- {domain}");
        for node in &nodes {
            let why = match node.role {
                Role::Primary => "a primary node: senders try it first",
                Role::Backup => "a backup node: used when no primary answers",
            };
            comment(&mut out, &format!("MX: mail for {domain} goes to node `{}`, {why}", node.name));
            record(&mut out, domain, "MX", &format!("{} {}.", mx_preference(node.role), node.hostname));
        }
        if scope != Scope::Cluster {
            continue;
        }
        comment(&mut out, &format!("SPF (RFC 7208): only the cluster's MX hosts send mail from {domain}; others fail"));
        if let Some(relay) = &config.outbound.relay {
            comment(
                &mut out,
                &format!(
                    "NOTE: outbound mail leaves through the relay {}: add the relay's SPF (its `include:` or \
                     its addresses) before -all, or receivers will fail SPF for every message",
                    relay.host
                ),
            );
        }
        record(&mut out, domain, "TXT", &format!("\"{DOMAIN_SPF}\""));
        comment(
            &mut out,
            &format!(
                "DMARC (RFC 7489): mail claiming to be from {domain} that passes neither aligned SPF nor \
                 aligned DKIM goes to spam (p=quarantine); relaxed alignment lets subdomains sign with the \
                 parent's keys. Move to p=reject once reports show only your own mail."
            ),
        );
        record(&mut out, &format!("_dmarc.{domain}"), "TXT", &format!("\"{DMARC}\""));
    }
    let mut done = BTreeSet::new();
    for node in &nodes {
        let host = node.hostname.as_str();
        if !done.insert(host) {
            continue;
        }
        let _ = writeln!(out, "\n; ---- {host}");
        if !config.cluster.domains.iter().any(|d| d == host) {
            comment(
                &mut out,
                &format!(
                    "SPF for the node's own name: bounces are sent with an empty MAIL FROM, so receivers \
                     check the HELO name {host}; it may send from its own address only"
                ),
            );
            record(&mut out, host, "TXT", &format!("\"{HOST_SPF}\""));
        }
        address_records(&mut out, node, addresses.get(&node.name).map_or(&[][..], Vec::as_slice));
    }
    if scope == Scope::Cluster && !config.dkim.is_empty() {
        let _ = writeln!(out, "\n; ---- DKIM keys");
        for entry in &config.dkim {
            let key = crate::dkim::load_key(entry)?;
            let scope = if entry.wildcard {
                format!("mail from any subdomain of {}", entry.domain)
            } else {
                format!("mail from {}", entry.domain)
            };
            let why = format!(
                "public key of selector {} ({}); receivers verify the signatures on {scope} with it",
                entry.selector,
                entry.key.display()
            );
            dkim_record(&mut out, &dkim_name(entry), entry.algorithm, &key.txt_value(), &why);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(reverse_name("192.0.2.7".parse().unwrap()), "7.2.0.192.in-addr.arpa");
        assert!(reverse_name("2001:db8::1".parse().unwrap()).ends_with(".8.b.d.0.1.0.0.2.ip6.arpa"));
    }

    #[test]
    fn node_scope_prints_only_what_the_node_adds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postern.toml");
        std::fs::write(dir.path().join("cluster.key"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(
            &path,
            "[cluster]\ndomains = [\"example.org\"]\nsecret_file = \"cluster.key\"\n[nodes.mail]\nhostname = \"mail.example.org\"\n\
             [nodes.mx2]\nhostname = \"mx2.example.net\"\nrole = \"backup\"\n",
        )
        .unwrap();
        let config = crate::config::load_file(&path).unwrap();
        let addrs = BTreeMap::from([("mx2".to_string(), vec!["192.0.2.9".parse().unwrap()])]);
        let zone = cluster_zone(&config, &addrs, Scope::Node("mx2")).unwrap();
        let records: Vec<&str> = zone.lines().filter(|l| !l.starts_with(';') && !l.is_empty()).collect();
        assert_eq!(
            records,
            [
                "example.org. 3600 IN MX 100 mx2.example.net.",
                "mx2.example.net. 3600 IN TXT \"v=spf1 a -all\"",
                "mx2.example.net. 3600 IN A 192.0.2.9",
                "9.2.0.192.in-addr.arpa. 3600 IN PTR mx2.example.net.",
            ]
        );
        let all = cluster_zone(&config, &addrs, Scope::Cluster).unwrap();
        assert!(all.contains("example.org. 3600 IN MX 10 mail.example.org.\n"), "{all}");
        assert!(all.contains("_dmarc.example.org. 3600 IN TXT"), "{all}");
        assert!(all.contains("(also needed, not printed: A/AAAA records of mail.example.org"), "{all}");
    }
}
