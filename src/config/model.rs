//! Typed configuration. Everything here has passed validation: addresses are lowercase, domains
//! belong to the cluster, alias graphs are loop-free, certificate files existed at load time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default for `[smtp] max_message_size` (50 MB, as the store promises to stream this much).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 50 * 1000 * 1000;

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and for finding relative paths).
    pub path: PathBuf,
    pub cluster: Cluster,
    /// Every node of the cluster, by table name (`[nodes.NAME]`).
    pub nodes: BTreeMap<String, Node>,
    /// Cluster-wide file certificate; a node's own `[nodes.NAME.tls]` overrides it.
    pub tls: Option<TlsFiles>,
    pub smtp: SmtpSettings,
    pub imap: ImapSettings,
    pub store: StoreSettings,
    /// Certificates from an ACME CA; replaces `[tls]` when present.
    pub acme: Option<AcmeSettings>,
    pub dns: DnsSettings,
    /// Users by lowercase address.
    pub users: BTreeMap<String, User>,
    /// Aliases by lowercase source: `local@domain` or `@domain` (domain alias / catch-all).
    pub aliases: BTreeMap<String, Vec<AliasTarget>>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    /// Lowercase, without trailing dot, in file order.
    pub domains: Vec<String>,
    /// `alice+lists@example.org` delivers to alice; `None` disables subaddressing.
    pub subaddress_separator: Option<char>,
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub hostname: String,
    pub role: Role,
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub control_socket: Option<PathBuf>,
    pub sync_address: Option<String>,
    pub tls: Option<TlsFiles>,
}

/// Listener addresses per protocol; an empty list means the protocol is off on this node.
#[derive(Debug, Clone, Default)]
pub struct Listen {
    pub smtp: Vec<SocketAddr>,
    pub submission: Vec<SocketAddr>,
    pub submissions: Vec<SocketAddr>,
    pub imap: Vec<SocketAddr>,
    pub imaps: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    pub sync: Vec<SocketAddr>,
    pub metrics: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes for the next command.
    pub command_timeout: Duration,
    /// RFC 5321 §4.5.3.2.6 (data block): 3 minutes at least; we wait this long per read.
    pub data_timeout: Duration,
    /// Disconnect a client after this many failed commands in one session.
    pub max_errors: usize,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        SmtpSettings {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: 100,
            max_connections: 1000,
            max_connections_per_ip: 20,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_errors: 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImapSettings {
    /// RFC 9051 §5.4: at least 30 minutes of inactivity before an autologout.
    pub idle_timeout: Duration,
    pub max_connections_per_ip: usize,
}

impl Default for ImapSettings {
    fn default() -> Self {
        ImapSettings { idle_timeout: Duration::from_secs(30 * 60), max_connections_per_ip: 50 }
    }
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// sled page cache size in bytes.
    pub cache_size: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings { cache_size: 64 * 1024 * 1024 }
    }
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Empty: the system's resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    /// Per question.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings { nameservers: Vec::new(), timeout: Duration::from_secs(5) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01,
    TlsAlpn01,
}

impl AcmeChallenge {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    /// `mailto:` URIs.
    pub contact: Vec<String>,
    pub challenge: AcmeChallenge,
    /// Extra trust for the directory's own HTTPS (test CAs such as Pebble).
    pub ca_file: Option<PathBuf>,
    /// Names beside the node's hostname.
    pub names: Vec<String>,
    /// For HTTP-01 where another web server owns port 80: challenge files are written here.
    pub webroot: Option<PathBuf>,
    /// External Account Binding: key id and base64url HMAC key.
    pub eab: Option<(String, String)>,
    /// Renew this long before expiry (or at two thirds of the lifetime, whichever is first).
    pub renew_before: Duration,
    /// How often the certificate is checked.
    pub check_interval: Duration,
    /// First wait after a failed order; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone)]
pub struct User {
    /// Lowercase address.
    pub address: String,
    /// An argon2 PHC string (`$argon2id$v=19$...`), verified to parse at load time.
    pub password_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasTarget {
    /// A full address, lowercase (a user, another alias, or, once the queue exists, outside).
    Address(String),
    /// `"@other.domain"`: only valid for a `@domain` source: same local part in another domain.
    Domain(String),
    /// `"/dev/null"`: accept and discard.
    Discard,
}

impl Config {
    /// Picks this process's node: `--node`, else the node whose hostname is this machine's FQDN,
    /// else the only node.
    pub fn select_node(&self, explicit: Option<&str>, fqdn: &str) -> Result<&Node, String> {
        let names = || self.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
        if let Some(name) = explicit {
            return self
                .nodes
                .get(name)
                .ok_or_else(|| format!("no node named {name:?} in {}; nodes: {}", self.path.display(), names()));
        }
        let fqdn = fqdn.trim_end_matches('.').to_ascii_lowercase();
        if let Some(n) = self.nodes.values().find(|n| n.hostname == fqdn) {
            return Ok(n);
        }
        if self.nodes.len() == 1 {
            return Ok(self.nodes.values().next().expect("one node"));
        }
        Err(format!(
            "cannot tell which node this is: no node's hostname is {fqdn:?}; pass --node with one of: {}",
            names()
        ))
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.cluster.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The certificate files for a node: its own, else the cluster's.
    pub fn tls_for<'a>(&'a self, node: &'a Node) -> Option<&'a TlsFiles> {
        node.tls.as_ref().or(self.tls.as_ref())
    }
}
