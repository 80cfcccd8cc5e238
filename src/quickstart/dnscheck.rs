//! `postern dns-check`: asks DNS for the records the config needs and says what is missing or
//! wrong, each with the fix: MX (every node, primaries preferred over backups), A/AAAA of each
//! node, reverse DNS (PTR) of those addresses, SPF of each domain and of each node's name
//! (evaluated for each node address, so `include:` and `ip4:` count), the DKIM key of every
//! `[[dkim]]` entry, and a DMARC record.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};

use super::zone;
use crate::config::{Config, Node, Role};
use crate::dns::{DnsError, Resolver};

#[derive(clap::Args, Debug, Clone)]
pub struct DnsCheckArgs {
    /// The cluster config file [default: $POSTERN_CONFIG, else /etc/postern/postern.toml]
    #[arg(long, short = 'c', env = "POSTERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check only what concerns this node [default: every node]
    #[arg(long, short = 'n')]
    pub node: Option<String>,
    /// Ask this name server (repeatable) [default: the config's [dns] nameservers, else the system's]
    #[arg(long = "nameserver", value_name = "IP:PORT")]
    pub nameservers: Vec<SocketAddr>,
}

/// One result line: fine, or a problem with its fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Problem { what: String, fix: String },
}

impl From<super::checks::Finding> for Outcome {
    fn from(f: super::checks::Finding) -> Outcome {
        match (f.level, f.fix) {
            (super::checks::Level::Ok, _) => Outcome::Ok(f.text),
            (super::checks::Level::Warning, fix) => Outcome::Problem { what: f.text, fix: fix.unwrap_or_default() },
        }
    }
}

impl Outcome {
    fn problem(what: impl Into<String>, fix: impl Into<String>) -> Outcome {
        Outcome::Problem { what: what.into(), fix: fix.into() }
    }

    pub fn render(&self) -> String {
        match self {
            Outcome::Ok(t) => format!("ok: {t}\n"),
            Outcome::Problem { what, fix } => format!("problem: {what}\n  fix: {fix}\n"),
        }
    }
}

/// `postern dns-check`.
pub fn command(args: DnsCheckArgs, default_config: &str) -> ExitCode {
    let path = args.config.clone().unwrap_or_else(|| PathBuf::from(default_config));
    let config = match crate::config::load_file(&path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    if let Some(name) = &args.node {
        if !config.nodes.contains_key(name) {
            let names: Vec<&str> = config.nodes.keys().map(String::as_str).collect();
            eprintln!("no node named {name:?} in {}; nodes: {}", path.display(), names.join(", "));
            return ExitCode::FAILURE;
        }
    }
    let nameservers = if args.nameservers.is_empty() { config.dns.nameservers.clone() } else { args.nameservers };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern dns-check: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(check(&config, args.node.as_deref(), &nameservers)) {
        Ok(outcomes) => {
            let problems = outcomes.iter().filter(|o| matches!(o, Outcome::Problem { .. })).count();
            for o in &outcomes {
                print!("{}", o.render());
            }
            if problems == 0 {
                println!("{}: the DNS records are in place", path.display());
                ExitCode::SUCCESS
            } else {
                println!("{}: {problems} problem(s)", path.display());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("postern dns-check: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn lookup_failed(what: &str, e: &DnsError) -> Outcome {
    Outcome::problem(
        format!("could not look up {what}: {e}"),
        "check the name servers (`[dns] nameservers`, or --nameserver), then run dns-check again",
    )
}

fn txt_fix(name: &str, value: &str) -> String {
    format!("publish `{}`", crate::dkim::txt_record(name, value))
}

/// Every check; `only` restricts them to one node (and to the records about it).
pub async fn check(config: &Config, only: Option<&str>, nameservers: &[SocketAddr]) -> anyhow::Result<Vec<Outcome>> {
    let timeout = config.dns.timeout;
    let resolver = Resolver::new(nameservers, timeout).map_err(|e| anyhow::anyhow!("resolver: {e}"))?;
    let auth = MessageAuthenticator(
        crate::dns::hickory_resolver(nameservers, timeout).map_err(|e| anyhow::anyhow!("resolver: {e}"))?,
    );
    let nodes: Vec<&Node> = config.nodes.values().filter(|n| only.is_none_or(|o| o == n.name)).collect();
    let mut out = Vec::new();

    // Addresses first: the SPF checks evaluate each node address.
    let mut addresses: Vec<(&Node, Vec<IpAddr>)> = Vec::new();
    for node in &nodes {
        let host = &node.hostname;
        let fix =
            format!("publish `{host}. {} IN A ADDRESS` (and AAAA for IPv6) with the node's public address", zone::TTL);
        let ips = match resolver.addresses(host).await {
            Ok(ips) if !ips.is_empty() => {
                let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                out.push(Outcome::Ok(format!("{host} has address {}", list.join(", "))));
                ips
            }
            Ok(_) | Err(DnsError::NoSuchDomain) => {
                out.push(Outcome::problem(format!("{host} (node `{}`) has no A or AAAA record", node.name), fix));
                Vec::new()
            }
            Err(e) => {
                out.push(lookup_failed(host, &e));
                Vec::new()
            }
        };
        out.extend(super::checks::reverse_check(&resolver, host, &ips).await.into_iter().map(Outcome::from));
        if !config.cluster.domains.iter().any(|d| d == host) {
            for ip in &ips {
                let spf = auth.verify_spf(SpfParameters::verify_ehlo(*ip, host, host)).await;
                match spf.result() {
                    SpfResult::Pass => out.push(Outcome::Ok(format!("SPF of {host} allows {ip} (HELO)"))),
                    r => out.push(Outcome::problem(
                        format!("SPF of {host} does not allow {ip}: {r:?} (bounces are checked against the HELO name)"),
                        txt_fix(host, zone::HOST_SPF),
                    )),
                }
            }
        }
        addresses.push((node, ips));
    }

    for domain in &config.cluster.domains {
        check_mx(&resolver, config, domain, &nodes, only.is_none(), &mut out).await;
        let spf_records = match resolver.txt(domain).await {
            Ok(txt) => txt.into_iter().filter(|t| t.to_ascii_lowercase().starts_with("v=spf1")).collect(),
            Err(DnsError::NoSuchDomain) => Vec::new(),
            Err(e) => {
                out.push(lookup_failed(&format!("the SPF record of {domain}"), &e));
                Vec::new()
            }
        };
        match spf_records.len() {
            0 => out.push(Outcome::problem(format!("{domain} has no SPF record"), txt_fix(domain, zone::DOMAIN_SPF))),
            1 => {
                for (node, ips) in &addresses {
                    for ip in ips {
                        let sender = format!("postmaster@{domain}");
                        let params = SpfParameters::verify_mail_from(*ip, &node.hostname, &node.hostname, &sender);
                        match auth.verify_spf(params).await.result() {
                            SpfResult::Pass => {
                                out.push(Outcome::Ok(format!("SPF of {domain} allows node `{}` ({ip})", node.name)))
                            }
                            r => out.push(Outcome::problem(
                                format!(
                                    "SPF of {domain} (\"{}\") does not allow node `{}` ({ip}): {r:?}",
                                    spf_records[0], node.name
                                ),
                                format!(
                                    "include the node: `{}` allows every MX host, or add `ip4:`/`ip6:` for its address",
                                    zone::DOMAIN_SPF
                                ),
                            )),
                        }
                    }
                }
            }
            _ => out.push(Outcome::problem(
                format!("{domain} has {} SPF records (receivers treat that as an error)", spf_records.len()),
                format!("keep one: `{}`", crate::dkim::txt_record(domain, zone::DOMAIN_SPF)),
            )),
        }
        if only.is_none() {
            let name = format!("_dmarc.{domain}");
            match resolver.txt(&name).await {
                Ok(txt) if txt.iter().any(|t| t.to_ascii_lowercase().starts_with("v=dmarc1")) => {
                    out.push(Outcome::Ok(format!("{domain} has a DMARC record")))
                }
                Ok(_) | Err(DnsError::NoSuchDomain) => {
                    out.push(Outcome::problem(format!("{domain} has no DMARC record"), txt_fix(&name, zone::DMARC)))
                }
                Err(e) => out.push(lookup_failed(&name, &e)),
            }
        }
    }

    // DKIM keys sign on primaries; a check of one backup node leaves them out.
    let signs = nodes.iter().any(|n| n.role == Role::Primary);
    for entry in config.dkim.iter().filter(|_| signs) {
        let name = zone::dkim_name(entry);
        let key = crate::dkim::load_key(entry)?;
        let want = key.public_key_b64();
        let fix = txt_fix(&name, &key.txt_value());
        match resolver.txt(&name).await {
            Ok(txt) if txt.iter().any(|t| dkim_p(t).as_deref() == Some(want.as_str())) => {
                out.push(Outcome::Ok(format!("DKIM key {name} matches {}", entry.key.display())))
            }
            Ok(txt) if !txt.is_empty() => out.push(Outcome::problem(
                format!("{name} publishes another key than {}", entry.key.display()),
                format!("replace it: {fix}"),
            )),
            Ok(_) | Err(DnsError::NoSuchDomain) => {
                out.push(Outcome::problem(format!("{name} is not published (key {})", entry.key.display()), fix))
            }
            Err(e) => out.push(lookup_failed(&name, &e)),
        }
    }
    Ok(out)
}

/// The `p=` tag of a DKIM key record, white space removed.
fn dkim_p(record: &str) -> Option<String> {
    record.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim() == "p").then(|| v.chars().filter(|c| !c.is_whitespace()).collect())
    })
}

async fn check_mx(
    resolver: &Resolver,
    config: &Config,
    domain: &str,
    nodes: &[&Node],
    all: bool,
    out: &mut Vec<Outcome>,
) {
    let plan = match resolver.mx_plan(domain).await {
        // No MX records: the plan is the domain itself as an implicit MX.
        Ok(plan) if plan.len() == 1 && plan[0].name == domain && plan[0].preference == 0 => Vec::new(),
        Ok(plan) => plan,
        Err(DnsError::NoSuchDomain) => Vec::new(),
        Err(DnsError::NullMx) => {
            out.push(Outcome::problem(
                format!("{domain} publishes a null MX (it refuses all mail)"),
                "remove the `MX 0 .` record and publish the MX records of `postern dns-records`",
            ));
            return;
        }
        Err(e) => {
            out.push(lookup_failed(&format!("the MX records of {domain}"), &e));
            return;
        }
    };
    let mut prefs: Vec<(&Node, u16)> = Vec::new();
    for node in nodes {
        let want = zone::mx_preference(node.role);
        let fix = format!("publish `{domain}. {} IN MX {want} {}.`", zone::TTL, node.hostname);
        match plan.iter().find(|h| h.name == node.hostname) {
            Some(h) => {
                out.push(Outcome::Ok(format!("MX {} {} for {domain} (node `{}`)", h.preference, h.name, node.name)));
                prefs.push((node, h.preference));
            }
            None => out.push(Outcome::problem(
                format!("{domain} has no MX record for node `{}` ({})", node.name, node.hostname),
                fix,
            )),
        }
    }
    // Every primary must be preferred over every backup (checked against all nodes in DNS).
    let all_prefs: Vec<(&Node, u16)> = config
        .nodes
        .values()
        .filter_map(|n| plan.iter().find(|h| h.name == n.hostname).map(|h| (n, h.preference)))
        .collect();
    for (node, pref) in &prefs {
        for (other, other_pref) in &all_prefs {
            let (primary, p, backup, b) = match (node.role, other.role) {
                (Role::Backup, Role::Primary) => (*other, *other_pref, *node, *pref),
                (Role::Primary, Role::Backup) if !nodes.iter().any(|n| n.name == other.name) => {
                    (*node, *pref, *other, *other_pref)
                }
                _ => continue,
            };
            if b <= p {
                out.push(Outcome::problem(
                    format!(
                        "the MX preference of backup `{}` ({b}) is not higher than that of primary `{}` ({p}) for \
                         {domain}: senders would deliver to the backup first",
                        backup.name, primary.name
                    ),
                    format!(
                        "publish `{domain}. {} IN MX {} {}.` (primaries {}, backups {})",
                        zone::TTL,
                        zone::mx_preference(Role::Backup),
                        backup.hostname,
                        zone::mx_preference(Role::Primary),
                        zone::mx_preference(Role::Backup)
                    ),
                ));
            }
        }
    }
    if all {
        for host in plan.iter().filter(|h| !config.nodes.values().any(|n| n.hostname == h.name)) {
            out.push(Outcome::problem(
                format!("{domain} has MX {} {}, which is not a node of the cluster", host.preference, host.name),
                "remove that MX record, or add the host to the config as a node",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dkim_p_tag() {
        assert_eq!(super::dkim_p("v=DKIM1; k=rsa; p=AB CD\t=").as_deref(), Some("ABCD="));
        assert_eq!(super::dkim_p("v=DKIM1; k=rsa"), None);
    }
}
