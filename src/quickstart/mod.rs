//! `postern quickstart`: from nothing to a configured node, and `postern dns-check`: are the
//! published DNS records what the config needs?
//!
//! Quickstart checks the machine first (`checks`: host name, forward and reverse DNS, NAT,
//! outbound port 25; nothing fatal), generates the secrets and keys, builds the config text
//! (`generate`), writes every file as one transaction (`write`: never overwriting, undone on any
//! failure, the config validated by the real loader before it is kept), and prints the DNS
//! records (`zone`). Everything it prints is a zone-file fragment: the records, and `;` comment
//! lines for the rest.

pub mod checks;
pub mod dnscheck;
pub mod generate;
pub mod write;
pub mod zone;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{Config, DkimAlgorithm, Role};
use checks::{Finding, Level};
use generate::{DkimSpec, NewCluster, NodeSpec};

pub use dnscheck::DnsCheckArgs;

/// Where quickstart writes when run as root (without `--dir`).
pub const ROOT_DIR: &str = "/etc/postern";
/// Where it writes otherwise: a new directory in the current one.
pub const USER_DIR: &str = "postern-config";
/// Per DNS question of the checks.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    Primary,
    Backup,
}

#[derive(clap::Args, Debug, Clone)]
pub struct QuickstartArgs {
    /// The first user's address; its domain becomes the cluster's mail domain
    pub email: String,
    /// The node's public host name [default: this machine's FQDN, else mail.DOMAIN]
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long, value_enum, default_value = "primary")]
    pub role: RoleArg,
    /// Add this node to an existing cluster file (edited in place) instead of writing a new one
    #[arg(long, value_name = "PATH")]
    pub cluster_file: Option<PathBuf>,
    /// Where to write a new cluster [default: /etc/postern as root, else ./postern-config]
    #[arg(long, value_name = "DIR", conflicts_with = "cluster_file")]
    pub dir: Option<PathBuf>,
    /// The node's data directory [default: /var/lib/postern as root, else data (beside the config)]
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// The node's name in the file [default: the first label of the hostname]
    #[arg(long, short = 'n')]
    pub node: Option<String>,
    /// The node's public address, for its A/AAAA and PTR records (repeatable) [default: the
    /// public addresses of this machine, else those the hostname resolves to]
    #[arg(long = "address", value_name = "IP")]
    pub addresses: Vec<IpAddr>,
    /// Name server for the checks (repeatable) [default: the cluster file's [dns] nameservers,
    /// else the system's]
    #[arg(long = "nameserver", value_name = "IP:PORT")]
    pub nameservers: Vec<SocketAddr>,
    /// Write no [acme] table: the node serves a self-signed certificate until [tls] or [acme] is set
    #[arg(long)]
    pub no_acme: bool,
    /// Skip the checks of the machine and the network
    #[arg(long)]
    pub no_checks: bool,
    /// Where the outbound port 25 check connects [default: the first MX host of gmail.com, port 25]
    #[arg(long, value_name = "HOST:PORT")]
    pub smtp_probe: Option<String>,
}

/// `postern quickstart`; `machine_fqdn` is this machine's name as `hostname -f` gives it.
pub fn command(args: QuickstartArgs, machine_fqdn: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern quickstart: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_root = unsafe { libc::geteuid() } == 0;
    match runtime.block_on(run(&args, machine_fqdn, is_root)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern quickstart: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `local@domain` → (address, domain), lowercase domain.
pub fn parse_email(email: &str) -> Result<(String, String)> {
    let email = email.trim();
    let (local, domain) = email.rsplit_once('@').ok_or_else(|| anyhow!("{email:?} is not an email address"))?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if local.is_empty() || local.contains(|c: char| c.is_whitespace() || c.is_control() || "\"(),:;<>@[\\]".contains(c))
    {
        bail!("{email:?} is not an email address this tool can set up (local part)");
    }
    if !checks::fqdn_check(&domain, false).level.eq(&Level::Ok) {
        bail!("{email:?}: `{domain}` is not a fully qualified domain name");
    }
    Ok((format!("{}@{domain}", local.to_lowercase()), domain))
}

fn random_secret() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

/// What the checks found and the addresses to publish.
struct Survey {
    findings: Vec<Finding>,
    published: Vec<IpAddr>,
    port25_blocked: bool,
}

async fn survey(args: &QuickstartArgs, hostname: &str, guessed: bool, nameservers: &[SocketAddr]) -> Survey {
    let interfaces = checks::interface_addresses();
    let public_here: Vec<IpAddr> =
        interfaces.iter().copied().filter(|ip| checks::classify(*ip) == checks::Class::Public).collect();
    let mut findings = vec![checks::fqdn_check(hostname, guessed)];
    if args.no_checks {
        let published = if args.addresses.is_empty() { public_here } else { args.addresses.clone() };
        return Survey { findings, published, port25_blocked: false };
    }
    let resolver = match crate::dns::Resolver::new(nameservers, DNS_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            findings
                .push(Finding::warn(format!("no DNS resolver: {e}"), "check /etc/resolv.conf or pass --nameserver"));
            let published = if args.addresses.is_empty() { public_here } else { args.addresses.clone() };
            return Survey { findings, published, port25_blocked: false };
        }
    };
    let ((resolved, forward), port25) = tokio::join!(
        checks::forward_check(&resolver, hostname),
        checks::outbound_check(&resolver, args.smtp_probe.as_deref())
    );
    findings.push(forward);
    let published = if !args.addresses.is_empty() {
        args.addresses.clone()
    } else if !public_here.is_empty() {
        public_here
    } else {
        // Behind NAT: the public addresses DNS already has for the name are the ones to keep.
        resolved.iter().copied().filter(|ip| checks::classify(*ip) == checks::Class::Public).collect()
    };
    findings.extend(checks::loopback_check(hostname, &resolved, &published));
    let mismatch: Vec<IpAddr> = published.iter().copied().filter(|ip| !resolved.contains(ip)).collect();
    if !resolved.is_empty() && !mismatch.is_empty() {
        findings.push(Finding::warn(
            format!(
                "{hostname} does not resolve to {}",
                mismatch.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
            ),
            format!("publish the A/AAAA records printed below for {hostname}"),
        ));
    }
    let nat_basis = if published.is_empty() { resolved.clone() } else { published.clone() };
    findings.push(checks::nat_check(hostname, &interfaces, &nat_basis));
    let reverse_of = if published.is_empty() { &resolved } else { &published };
    findings.extend(checks::reverse_check(&resolver, hostname, reverse_of).await);
    let (port25, port25_blocked) = port25;
    findings.push(port25);
    Survey { findings, published, port25_blocked }
}

/// `--data-dir`, else the default for root, else `relative` (to the config file).
fn data_dir_for(args: &QuickstartArgs, is_root: bool, relative: &str) -> String {
    match &args.data_dir {
        Some(d) => std::path::absolute(d).unwrap_or_else(|_| d.clone()).display().to_string(),
        None if is_root => "/var/lib/postern".to_string(),
        None => relative.to_string(),
    }
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Everything quickstart does; returns what to print. Nothing stays written when it fails.
pub async fn run(args: &QuickstartArgs, machine_fqdn: &str, is_root: bool) -> Result<String> {
    let (email, domain) = parse_email(&args.email)?;
    let role = match args.role {
        RoleArg::Primary => Role::Primary,
        RoleArg::Backup => Role::Backup,
    };
    let existing: Option<Config> = match &args.cluster_file {
        Some(path) => Some(
            crate::config::load_file(path)
                .map_err(|errors| anyhow!("{} does not load; fix it first:\n{errors}", path.display()))?,
        ),
        None if role == Role::Backup => bail!(
            "a backup node joins an existing cluster: pass --cluster-file with the cluster's postern.toml \
             (written by quickstart on the primary)"
        ),
        None => None,
    };
    if let Some(cfg) = &existing {
        if !cfg.is_local_domain(&domain) {
            bail!(
                "{domain} is not one of the cluster's domains ({}) in {}",
                cfg.cluster.domains.join(", "),
                cfg.path.display()
            );
        }
    }
    let machine = machine_fqdn.trim_end_matches('.').to_ascii_lowercase();
    let (hostname, guessed) = match &args.hostname {
        Some(h) => (h.trim().trim_end_matches('.').to_ascii_lowercase(), false),
        None if checks::fqdn_check(&machine, false).level == Level::Ok && machine != "localhost" => (machine, false),
        None => (format!("mail.{domain}"), true),
    };
    let fqdn = checks::fqdn_check(&hostname, false);
    if fqdn.level != Level::Ok {
        bail!("{}: {}", fqdn.text, fqdn.fix.unwrap_or_default());
    }
    let node_name = match &args.node {
        Some(n) => n.clone(),
        None => hostname.split('.').next().unwrap_or("mail").to_string(),
    };
    if !valid_node_name(&node_name) {
        bail!("{node_name:?} cannot be a node name: use letters, digits, `-` and `_` (--node)");
    }
    if let Some(cfg) = &existing {
        if cfg.nodes.contains_key(&node_name) {
            bail!("{} already has a node named {node_name:?}; choose another with --node", cfg.path.display());
        }
        if let Some(other) = cfg.nodes.values().find(|n| n.hostname == hostname) {
            bail!("{} already has a node with hostname {hostname} (node {:?})", cfg.path.display(), other.name);
        }
    }
    let nameservers: Vec<SocketAddr> = if args.nameservers.is_empty() {
        existing.as_ref().map(|c| c.dns.nameservers.clone()).unwrap_or_default()
    } else {
        args.nameservers.clone()
    };

    let survey = survey(args, &hostname, guessed, &nameservers).await;
    let ipv6 = survey.published.iter().any(IpAddr::is_ipv6);
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();

    let mut out = String::new();
    let _ = writeln!(out, "; postern quickstart {email}: node `{node_name}` ({hostname}, {})", role.as_str());
    let mut tx = write::Transaction::new();
    let (config_path, scope_node, standby, password) = match &existing {
        None => {
            let dir = match &args.dir {
                Some(d) => d.clone(),
                None if is_root => PathBuf::from(ROOT_DIR),
                None => PathBuf::from(USER_DIR),
            };
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let data_dir = data_dir_for(args, is_root, "data");
            let node = NodeSpec {
                name: node_name.clone(),
                hostname: hostname.clone(),
                role,
                data_dir,
                ipv6,
                http: !args.no_acme,
                https: false,
            };
            let (cfg_path, standby, password) =
                write_new_cluster(&mut tx, &dir, &email, &domain, node, args, &survey, &date)?;
            (cfg_path, None, Some(standby), Some(password))
        }
        Some(cfg) => {
            let (password, written) =
                write_added_node(&mut tx, cfg, args, &email, &node_name, &hostname, role, ipv6, is_root, &date)?;
            for line in written {
                let _ = writeln!(out, "{line}");
            }
            (cfg.path.clone(), Some(node_name.clone()), None, password)
        }
    };
    let config = crate::config::load_file(&config_path)
        .map_err(|errors| anyhow!("the written config does not load (nothing is kept):\n{errors}"))?;
    let addresses = BTreeMap::from([(node_name.clone(), survey.published.clone())]);
    let scope = match &scope_node {
        Some(n) => zone::Scope::Node(n),
        None => zone::Scope::Cluster,
    };
    let mut records = zone::cluster_zone(&config, &addresses, scope)?;
    if let Some((name, algorithm, txt)) = &standby {
        let why = "the standby key, not signing yet: published now so that switching to it is only a config edit";
        zone::dkim_record(&mut records, name, *algorithm, txt, why);
    }
    tx.commit();

    if scope_node.is_none() {
        let _ = writeln!(out, "; wrote {} and the files it names (keys and secrets mode 0600)", config_path.display());
    }
    if let Some(pw) = &password {
        let _ = writeln!(out, "; user {email} password {pw}  (shown once; it is not stored in clear)");
    }
    out.push_str(";\n; ---- checks (none is fatal)\n");
    for f in &survey.findings {
        out.push_str(&f.render());
    }
    out.push_str(";\n");
    out.push_str(&records);
    out.push_str(&next_steps(&config_path, &node_name, role, scope_node.is_some()));
    Ok(out)
}

fn next_steps(config: &Path, node: &str, role: Role, added: bool) -> String {
    let mut out = String::from("\n; ---- next steps\n");
    let cfg = config.display();
    out.push_str("; 1. publish the records above in your DNS (PTR records at the provider of the addresses)\n");
    if added {
        out.push_str(&format!(
            "; 2. copy {cfg} (and the files it names: the cluster secret, DKIM keys, SRS secret) to every \
             node, this one included, and restart the nodes that were running\n"
        ));
    } else {
        out.push_str(&format!(
            "; 2. keep {cfg} and the files beside it together; to add a backup MX, run on that machine \
             `postern quickstart {role_hint} --role backup --cluster-file postern.toml` with a copy of them\n",
            role_hint = "YOU@DOMAIN --hostname mx2.DOMAIN"
        ));
    }
    out.push_str(&format!("; 3. postern check-config --config {cfg} --node {node}\n"));
    out.push_str(&format!("; 4. postern serve --config {cfg} --node {node}   (or enable the service)\n"));
    out.push_str(&format!("; 5. once DNS has the records: postern dns-check --config {cfg}\n"));
    if role == Role::Primary && !added {
        out.push_str(
            "; mail clients: IMAP on 993 (TLS) or 143 (STARTTLS), SMTP submission on 465 (TLS) or 587 (STARTTLS)\n",
        );
    }
    out
}

/// A new DKIM key file in the transaction: (selector spec, record name, txt value).
fn dkim_key(tx: &mut write::Transaction, dir: &Path, domain: &str, selector: &str) -> Result<(DkimSpec, String)> {
    let (pem, key) = crate::dkim::generate(DkimAlgorithm::RsaSha256, 2048).context("generating a DKIM key")?;
    let rel = format!("dkim/{domain}-{selector}.key");
    tx.create_file(&dir.join(&rel), pem.as_bytes(), 0o600)?;
    Ok((DkimSpec { selector: selector.to_string(), algorithm: "rsa-sha256", key: rel }, key.txt_value()))
}

type Standby = (String, DkimAlgorithm, String);

#[allow(clippy::too_many_arguments)]
fn write_new_cluster(
    tx: &mut write::Transaction,
    dir: &Path,
    email: &str,
    domain: &str,
    node: NodeSpec,
    args: &QuickstartArgs,
    survey: &Survey,
    date: &str,
) -> Result<(PathBuf, Standby, String)> {
    let config_path = dir.join("postern.toml");
    let month = chrono::Utc::now().format("%Y%m").to_string();
    let (active_sel, standby_sel) = (format!("{month}a"), format!("{month}b"));
    let planned = [
        "postern.toml".to_string(),
        "cluster.key".to_string(),
        "srs.secret".to_string(),
        format!("dkim/{domain}-{active_sel}.key"),
        format!("dkim/{domain}-{standby_sel}.key"),
    ];
    let existing: Vec<String> = planned
        .iter()
        .map(|p| dir.join(p))
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        bail!("quickstart never overwrites a file, and these exist: {} (choose another --dir)", existing.join(", "));
    }
    tx.create_dirs(dir)?;
    tx.create_file(&dir.join("cluster.key"), format!("{}\n", random_secret()).as_bytes(), 0o600)?;
    tx.create_file(&dir.join("srs.secret"), format!("{}\n", random_secret()).as_bytes(), 0o600)?;
    let (active, _) = dkim_key(tx, dir, domain, &active_sel)?;
    let (standby, standby_txt) = dkim_key(tx, dir, domain, &standby_sel)?;
    let password = crate::auth::generate_password();
    let spec = NewCluster {
        email: email.to_string(),
        domain: domain.to_string(),
        node,
        password_hash: crate::auth::hash_password(&password),
        acme_directory: (!args.no_acme).then(|| generate::LETS_ENCRYPT.to_string()),
        dkim_active: active,
        dkim_standby: standby,
        cluster_secret_file: "cluster.key".to_string(),
        srs_secret_file: "srs.secret".to_string(),
        date: date.to_string(),
        port25_blocked: survey.port25_blocked,
    };
    let text = generate::new_cluster(&spec);
    crate::config::load_str(&text, &config_path)
        .map_err(|errors| anyhow!("the generated config does not load (nothing is kept):\n{errors}"))?;
    tx.create_file(&config_path, text.as_bytes(), 0o600)?;
    let standby_name = format!("{standby_sel}._domainkey.{domain}");
    Ok((config_path, (standby_name, DkimAlgorithm::RsaSha256, standby_txt), password))
}

/// Adds the node to the cluster file; returns the new user's password (a primary whose user is
/// not in the file yet) and `;` lines saying what was written.
#[allow(clippy::too_many_arguments)]
fn write_added_node(
    tx: &mut write::Transaction,
    cfg: &Config,
    args: &QuickstartArgs,
    email: &str,
    node_name: &str,
    hostname: &str,
    role: Role,
    ipv6: bool,
    is_root: bool,
    date: &str,
) -> Result<(Option<String>, Vec<String>)> {
    let path = &cfg.path;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut written = Vec::new();
    let secret = match &cfg.cluster.secret_file {
        Some(_) => None,
        None => {
            let secret_path = dir.join("cluster.key");
            tx.create_file(&secret_path, format!("{}\n", random_secret()).as_bytes(), 0o600)?;
            written.push(format!("; wrote the cluster secret {} (mode 0600)", secret_path.display()));
            Some("cluster.key")
        }
    };
    let (http, https) = match &cfg.acme {
        Some(a) if a.webroot.is_none() => match a.challenge {
            crate::config::AcmeChallenge::Http01 => (true, false),
            crate::config::AcmeChallenge::TlsAlpn01 => (false, true),
        },
        _ => (false, false),
    };
    let data_dir = data_dir_for(args, is_root, &format!("data-{node_name}"));
    let node =
        NodeSpec { name: node_name.to_string(), hostname: hostname.to_string(), role, data_dir, ipv6, http, https };
    let password = (role == Role::Primary && !cfg.users.contains_key(email)).then(crate::auth::generate_password);
    let hash = password.as_deref().map(crate::auth::hash_password);
    let user = hash.as_deref().map(|h| (email, h));
    let new_text = generate::add_node(&text, &node, user, secret, date)
        .map_err(|e| anyhow!("cannot add the node to {}: {e}", path.display()))?;
    crate::config::load_str(&new_text, path).map_err(|errors| {
        anyhow!("{} with the node added does not load (nothing is kept):\n{errors}", path.display())
    })?;
    tx.replace_file(path, new_text.as_bytes())?;
    written.push(format!("; added node `{node_name}` to {}", path.display()));
    Ok((password, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(parse_email("Alice@Example.ORG.").unwrap(), ("alice@example.org".into(), "example.org".into()));
        assert!(parse_email("alice").is_err());
        assert!(parse_email("@example.org").is_err());
        assert!(parse_email("alice@localhost").is_err());
        assert!(parse_email("a b@example.org").is_err());
    }
}
