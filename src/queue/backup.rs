//! Where a node's own cluster domains go when the node is a backup MX (RFC 5321 §5.1, as
//! OpenSMTPD's `relay backup` and Postfix's `permit_mx_backup` do it):
//!
//! * the MX hosts of the domain whose preference is better (lower) than this node's own entry,
//!   never this node or one of equal or worse preference;
//! * when DNS names no MX for the domain, or cannot answer, or this node is not among the MX
//!   hosts at all, the primaries as the cluster file lists them;
//! * when DNS lists this node as the best MX, nothing: relaying would loop, so the mail stays
//!   queued with the reason shown by `postern queue list` until the records are fixed.
//!
//! Hops to hosts that are nodes of the cluster authenticate with the cluster secret.

use std::net::{IpAddr, SocketAddr};

use super::Queue;
use crate::config::{Config, Node, Role, Secret};
use crate::dns::{DnsError, MxHost};

/// What the queue knows about the cluster it belongs to.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub role: Role,
    /// This node's name (sent in cluster authentication).
    pub node: String,
    pub secret: Option<Secret>,
    /// The cluster's domains, lowercase.
    pub domains: Vec<String>,
    /// Every other node: name, hostname, role and SMTP listener addresses.
    pub peers: Vec<Peer>,
    /// Our own SMTP listener addresses: an MX that resolves to one of them is a loop.
    pub own_smtp: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub hostname: String,
    pub role: Role,
    pub smtp: Vec<SocketAddr>,
}

impl ClusterView {
    pub fn from_config(config: &Config, node: &Node, own_smtp: Vec<SocketAddr>) -> ClusterView {
        ClusterView {
            own_smtp,
            role: node.role,
            node: node.name.clone(),
            secret: config.cluster.secret.clone(),
            domains: config.cluster.domains.clone(),
            peers: config
                .nodes
                .values()
                .filter(|n| n.name != node.name)
                .map(|n| Peer {
                    name: n.name.clone(),
                    hostname: n.hostname.clone(),
                    role: n.role,
                    smtp: n.listen.smtp.clone(),
                })
                .collect(),
        }
    }

    /// Whether `host` is one of the other nodes (then the hop must authenticate).
    pub fn is_peer_host(&self, host: &str) -> bool {
        self.peers.iter().any(|p| p.hostname.eq_ignore_ascii_case(host.trim_end_matches('.')))
    }

    pub fn is_cluster_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// A host to try: its name (for TLS SNI and logs), its addresses and the port.
pub(super) type Hop = (String, Vec<IpAddr>, u16);

impl Queue {
    /// The hosts a backup relays a cluster domain to; `Err` is why it must not (a loop).
    pub(super) async fn backup_hops(&self, domain: &str) -> Result<Vec<Hop>, String> {
        let plan = match self.resolver.mx_plan(domain).await {
            Ok(plan) => plan,
            Err(e) => {
                let why = match e {
                    DnsError::Temporary(_) => format!("DNS cannot say ({e})"),
                    _ => format!("DNS names no MX ({e})"),
                };
                tracing::info!("queue backup domain={domain} {why}: relaying to the primaries in the config");
                return Ok(self.primary_hops().await);
            }
        };
        // No MX records: the plan is the domain itself as an implicit MX (RFC 5321 §5.1).
        let implicit = plan.len() == 1 && plan[0].preference == 0 && plan[0].name.eq_ignore_ascii_case(domain);
        let own = plan.iter().filter(|mx| self.is_me(mx)).map(|mx| mx.preference).min();
        match own {
            Some(mine) => {
                let better: Vec<Hop> = plan
                    .into_iter()
                    .filter(|mx| mx.preference < mine && !self.is_me(mx))
                    .map(|mx| (mx.name, mx.addresses, self.settings.mx_port))
                    .collect();
                if better.is_empty() {
                    let why = format!(
                        "mail loops back to myself: DNS lists this node ({}) as the best MX for {domain} \
                         (preference {mine}); give the primaries a lower preference",
                        self.hostname
                    );
                    tracing::warn!("queue backup domain={domain} refusing to relay: {why}");
                    return Err(why);
                }
                Ok(better)
            }
            None if implicit => Ok(self.primary_hops().await),
            None => Ok(plan.into_iter().map(|mx| (mx.name, mx.addresses, self.settings.mx_port)).collect()),
        }
    }

    /// The primaries as the cluster file lists them: a listener on a specific address is used
    /// as it is; one on a wildcard address is reached through the node's hostname.
    async fn primary_hops(&self) -> Vec<Hop> {
        let mut hops = Vec::new();
        for peer in self.cluster.peers.iter().filter(|p| p.role == Role::Primary) {
            for addr in &peer.smtp {
                if addr.ip().is_unspecified() {
                    match self.resolver.addresses(&peer.hostname).await {
                        Ok(ips) => hops.push((peer.hostname.clone(), ips, addr.port())),
                        Err(e) => tracing::info!("queue primary {} hostname={} error={e}", peer.name, peer.hostname),
                    }
                } else {
                    hops.push((peer.hostname.clone(), vec![addr.ip()], addr.port()));
                }
            }
        }
        hops
    }

    /// This node, by its hostname or one of its addresses (RFC 5321 §5.1 asks the client to
    /// recognise itself in the MX list).
    fn is_me(&self, mx: &MxHost) -> bool {
        mx.name.eq_ignore_ascii_case(&self.hostname)
            || mx.addresses.iter().any(|ip| self.is_own_address(SocketAddr::new(*ip, self.settings.mx_port)))
    }
}
