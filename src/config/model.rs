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
    /// Sender rewriting for forwarded mail (`[srs]`).
    pub srs: Option<SrsSettings>,
    pub smtp: SmtpSettings,
    pub imap: ImapSettings,
    pub store: StoreSettings,
    /// Certificates from an ACME CA; replaces `[tls]` when present.
    pub acme: Option<AcmeSettings>,
    pub dns: DnsSettings,
    pub outbound: OutboundSettings,
    pub submission: SubmissionSettings,
    /// Checks on mail arriving on port 25 (`[inbound]`).
    pub inbound: super::inbound::InboundSettings,
    /// Users by lowercase address.
    pub users: BTreeMap<String, User>,
    /// Aliases by lowercase source: `local@domain` or `@domain` (domain alias / catch-all).
    pub aliases: BTreeMap<String, Vec<AliasTarget>>,
    /// `[[dkim]]` signing keys, in file order.
    pub dkim: Vec<DkimKey>,
    /// `[sync]`: replication between the primaries; `None` turns it off.
    pub sync: Option<SyncSettings>,
}

/// `[sync]` as written; [`Config::sync_peers`] and [`Config::sync_order`] resolve the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// Primaries to replicate with; `None`: every primary. A node skips itself.
    pub peers: Option<Vec<String>>,
    /// UID allocator preference; primaries not listed follow by name.
    pub order: Vec<String>,
    /// How long a delivery waits for one peer's durable ack (used by a later release).
    pub ack_timeout: Duration,
    /// How long change-log records are kept for peers (used by a later release).
    pub retention: Duration,
    /// Time between anti-entropy passes (used by a later release).
    pub anti_entropy_interval: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            peers: None,
            order: Vec::new(),
            ack_timeout: Duration::from_secs(2),
            retention: Duration::from_secs(30 * 86400),
            anti_entropy_interval: Duration::from_secs(86400),
        }
    }
}

/// One `[[dkim]]` entry; its key file parsed when the config was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKey {
    /// Lowercase, without `*.` and trailing dot: the `d=` of the signatures.
    pub domain: String,
    /// Written `*.domain`: signs mail from every subdomain of `domain` (not `domain` itself).
    pub wildcard: bool,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    Ed25519,
    RsaSha256,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    /// Lowercase, without trailing dot, in file order.
    pub domains: Vec<String>,
    /// `alice+lists@example.org` delivers to alice; `None` disables subaddressing.
    pub subaddress_separator: Option<char>,
    pub secret_file: Option<PathBuf>,
    /// The contents of `secret_file` (trimmed): authenticates node-to-node traffic.
    pub secret: Option<Secret>,
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
    /// `[nodes.NAME.queue]`: this node's own retry policy, over the role's defaults.
    pub queue: NodeQueue,
}

/// Per-node overrides of the queue schedule (`[nodes.NAME.queue]`); `None` keeps the default
/// of the node's role: `[outbound]` for a primary, the backup-MX policy for a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeQueue {
    pub retry_initial: Option<Duration>,
    pub retry_max: Option<Duration>,
    pub lifetime: Option<Duration>,
    /// `Some(None)` is `"off"`.
    pub delay_warning: Option<Option<Duration>>,
    pub run_interval: Option<Duration>,
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
    /// Development only: LOGIN without TLS from 127.0.0.0/8 and ::1.
    pub plaintext_on_loopback: bool,
}

impl Default for ImapSettings {
    fn default() -> Self {
        ImapSettings {
            idle_timeout: Duration::from_secs(30 * 60),
            max_connections_per_ip: 50,
            plaintext_on_loopback: false,
        }
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

/// A value that must never reach a log or `check-config` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// How to reach a smarthost or a per-domain route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTls {
    /// `smtps://`: TLS from the first byte, certificate verified.
    Implicit,
    /// `smtp://` with credentials: STARTTLS must succeed and verify before AUTH.
    StartTlsRequired,
    /// `smtp://` without credentials: like MX delivery.
    Opportunistic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRoute {
    /// As written, for messages and `check-config`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: RelayTls,
    pub user: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// The port MX delivery connects to: 25 on the internet, something else in tests.
    pub mx_port: u16,
    /// Smarthost for everything that leaves.
    pub relay: Option<RelayRoute>,
    /// Per recipient domain (exact match), before `relay`.
    pub routes: BTreeMap<String, RelayRoute>,
    /// Postfix-like schedule: the first retry after `retry_initial`, doubling up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Give up (bounce) after this long in the queue.
    pub lifetime: Duration,
    /// Tell the sender once when a message has waited this long; `None` is `"off"`.
    pub delay_warning: Option<Duration>,
    /// Deliveries in progress at once, overall and per destination domain.
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    pub connect_timeout: Duration,
    /// Extra trust anchors for verifying peers (a private smarthost, test CAs).
    pub ca_file: Option<PathBuf>,
    /// A queue run: this often the oldest deferred entry is tried even before it is due, and
    /// when it gets through every deferred entry follows (a backup MX notices its primary is
    /// back within one run, as Postfix's `queue_run_delay`). `None`: entries wait for their time.
    pub run_interval: Option<Duration>,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        OutboundSettings {
            mx_port: 25,
            relay: None,
            routes: BTreeMap::new(),
            retry_initial: Duration::from_secs(5 * 60),
            retry_max: Duration::from_secs(60 * 60),
            lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: Some(Duration::from_secs(4 * 3600)),
            max_connections: 100,
            max_connections_per_domain: 20,
            connect_timeout: Duration::from_secs(30),
            ca_file: None,
            run_interval: None,
        }
    }
}

/// Limits for authenticated senders; each user may override the first three.
#[derive(Debug, Clone)]
pub struct SubmissionSettings {
    pub max_messages_per_hour: usize,
    pub max_recipients: usize,
    /// File a copy of each submitted message in the sender's Sent mailbox.
    pub save_sent: bool,
    /// Failed AUTH attempts allowed per client address and per user within the window.
    pub auth_failures_per_ip: usize,
    pub auth_failures_per_user: usize,
    pub auth_failure_window: Duration,
}

impl Default for SubmissionSettings {
    fn default() -> Self {
        SubmissionSettings {
            max_messages_per_hour: 500,
            max_recipients: 100,
            save_sent: false,
            auth_failures_per_ip: 10,
            auth_failures_per_user: 5,
            auth_failure_window: Duration::from_secs(15 * 60),
        }
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
    /// Extra addresses (or `@domain` for a whole domain) this user may send as, beside their
    /// own address and the aliases that deliver to them.
    pub send_as: Vec<String>,
    /// Overrides of `[submission]`.
    pub max_messages_per_hour: Option<usize>,
    pub max_recipients: Option<usize>,
    pub save_sent: Option<bool>,
    /// Storage limit of all the user's mailboxes together, in bytes (RFC 9208 STORAGE); `None`:
    /// unlimited.
    pub quota: Option<u64>,
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

    /// The queue policy a node runs with: `[outbound]`, the backup-MX schedule for a backup
    /// (seed 002: retries every 1 to 10 minutes, a queue run every minute, four weeks before a
    /// bounce, no delay warnings), then the node's own `[nodes.NAME.queue]` keys.
    pub fn outbound_for(&self, node: &Node) -> OutboundSettings {
        let mut out = self.outbound.clone();
        if node.role == Role::Backup {
            out.retry_initial = Duration::from_secs(60);
            out.retry_max = Duration::from_secs(600);
            out.lifetime = Duration::from_secs(28 * 24 * 3600);
            out.delay_warning = None;
            out.run_interval = Some(Duration::from_secs(60));
        }
        let q = &node.queue;
        out.retry_initial = q.retry_initial.unwrap_or(out.retry_initial);
        out.retry_max = q.retry_max.unwrap_or(out.retry_max).max(out.retry_initial);
        out.lifetime = q.lifetime.unwrap_or(out.lifetime);
        out.delay_warning = q.delay_warning.unwrap_or(out.delay_warning);
        out.run_interval = q.run_interval.or(out.run_interval);
        out
    }

    /// The primaries, for a backup that finds no better MX in DNS.
    pub fn primaries(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.role == Role::Primary)
    }

    /// The nodes `node` replicates with: `[sync] peers` (default every primary), without itself.
    /// Empty when replication is off.
    pub fn sync_peers(&self, node: &str) -> Vec<String> {
        let Some(sync) = &self.sync else { return Vec::new() };
        match &sync.peers {
            Some(peers) => peers.iter().filter(|p| *p != node).cloned().collect(),
            None => self.primaries().filter(|n| n.name != node).map(|n| n.name.clone()).collect(),
        }
    }

    /// Every primary in UID allocator preference: `[sync] order`, then the rest by name.
    pub fn sync_order(&self) -> Vec<String> {
        let mut order = self.sync.as_ref().map(|s| s.order.clone()).unwrap_or_default();
        for node in self.primaries() {
            if !order.contains(&node.name) {
                order.push(node.name.clone());
            }
        }
        order
    }

    /// Where peers dial `node`'s sync listener: `sync_address`, else its hostname with the port
    /// of its first `listen.sync` (`None` when it has neither a sync address nor a usable port).
    pub fn sync_address(&self, node: &Node) -> Option<String> {
        if let Some(address) = &node.sync_address {
            return Some(address.clone());
        }
        let port = node.listen.sync.first()?.port();
        (port != 0).then(|| format!("{}:{port}", node.hostname))
    }

    /// The certificate files for a node: its own, else the cluster's.
    pub fn tls_for<'a>(&'a self, node: &'a Node) -> Option<&'a TlsFiles> {
        node.tls.as_ref().or(self.tls.as_ref())
    }
}

/// `[srs]`: the Sender Rewriting Scheme for forwarded mail.
#[derive(Debug, Clone)]
pub struct SrsSettings {
    /// Lowercase; one of `cluster.domains` (bounces to SRS addresses must come back here).
    pub domain: String,
    /// The lines of `secret_file`: the first signs, all verify.
    pub secrets: Vec<Secret>,
    /// How long an SRS address stays valid (whole days count; default 21 days).
    pub max_age: Duration,
}
