//! One delivery attempt for one queue entry: group the recipients by domain, pick each
//! domain's destination (a route, the smarthost, or its MX hosts), hand the message over with
//! one transaction per destination, then write back what is left and bounce what failed.

use std::io;
use std::net::{IpAddr, SocketAddr};

use super::bounce;
use super::pool::Pooled;
use super::schedule;
use super::Queue;
use crate::config::{RelayRoute, RelayTls};
use crate::delivery::remote::{
    ChunkSource, ClientConfig, DeliveryReport, Envelope, RcptOutcome, SessionError, SmtpClient, TlsPolicy,
};
use crate::dns::DnsError;
use crate::dsn::RecipientStatus;
use crate::store::{QueueEntry, QueueRecipient};

/// Where mail for one domain goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A configured route or the smarthost.
    Relay(RelayRoute),
    /// The domain's MX hosts (RFC 5321 §5.1).
    Mx(String),
    /// One of the cluster's own domains, on a backup MX: the better MX hosts, else the
    /// primaries (`backup`).
    Cluster(String),
}

impl Destination {
    /// The key for connection reuse and per-destination limits.
    fn key(&self) -> String {
        match self {
            Destination::Relay(r) => format!("relay:{}:{}", r.host, r.port),
            Destination::Mx(domain) => format!("mx:{domain}"),
            Destination::Cluster(domain) => format!("cluster:{domain}"),
        }
    }

    /// The key for the concurrency limit: the cluster's domains all end at the same primaries,
    /// so a backup shares one limit among them (a week of queued mail must not flatten them).
    fn slots_key(&self) -> String {
        match self {
            Destination::Cluster(_) => "cluster".to_string(),
            _ => self.key(),
        }
    }
}

/// What became of one recipient in this attempt.
enum Outcome {
    Delivered,
    /// Try again later; the text goes to `queue list` and a delay warning.
    Deferred(String),
    /// Deferred because delivering would loop back here (a backup listed as the best MX).
    Looped(String),
    /// Give up: (enhanced status, diagnostic, remote MTA).
    Failed(String, String, Option<String>),
}

/// A whole-destination result: the same for every recipient of the group.
fn all(n: usize, outcome: impl Fn() -> Outcome) -> Vec<Outcome> {
    (0..n).map(|_| outcome()).collect()
}

impl Queue {
    /// The destination for a recipient domain: an exact route, else the smarthost, else MX.
    pub fn destination(&self, domain: &str) -> Destination {
        if self.cluster.role == crate::config::Role::Backup && self.cluster.is_cluster_domain(domain) {
            return Destination::Cluster(domain.to_string());
        }
        if let Some(route) = self.settings.routes.get(domain) {
            return Destination::Relay(route.clone());
        }
        match &self.settings.relay {
            Some(relay) => Destination::Relay(relay.clone()),
            None => Destination::Mx(domain.to_string()),
        }
    }

    /// Runs one attempt and records its result. Never panics on what remote servers say.
    /// Returns true when an entry that had failed before delivered something now.
    pub(super) async fn deliver(&self, mut entry: QueueEntry) -> bool {
        let id = entry.display_id();
        let now = chrono::Utc::now().timestamp();
        if schedule::expired(entry.created, now, &self.settings) {
            self.expire(entry).await;
            return false;
        }
        let counters = crate::metrics::counters();
        let failed_before = entry.attempts > 0;
        let mut delivered = 0;
        let mut groups: Vec<(String, Vec<QueueRecipient>)> = Vec::new();
        for r in std::mem::take(&mut entry.recipients) {
            let domain = r.domain().to_ascii_lowercase();
            match groups.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, list)) => list.push(r),
                None => groups.push((domain, vec![r])),
            }
        }
        let mut failed: Vec<RecipientStatus> = Vec::new();
        let mut remaining = Vec::new();
        for (domain, rcpts) in groups {
            let dest = self.destination(&domain);
            let slots = self.destination_slots(&dest.slots_key());
            let Ok(_permit) = slots.acquire_owned().await else { return false };
            let outcomes = self.deliver_group(&entry, &dest, &rcpts).await;
            for (mut r, outcome) in rcpts.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Delivered => {
                        delivered += 1;
                        crate::metrics::add(&counters.relay_ok, 1);
                        crate::metrics::dequeued(1);
                    }
                    Outcome::Looped(why) => {
                        crate::metrics::add(&counters.relay_loop, 1);
                        r.last_error = Some(why.clone());
                        entry.last_error = Some(why);
                        remaining.push(r);
                    }
                    Outcome::Deferred(why) => {
                        crate::metrics::add(&counters.relay_tmpfail, 1);
                        tracing::info!("queue id={id} to=<{}> result=deferred error={why}", r.address);
                        r.last_error = Some(why.clone());
                        entry.last_error = Some(why);
                        remaining.push(r);
                    }
                    Outcome::Failed(status, diagnostic, mta) => {
                        let kind = if status == "5.4.6" { &counters.relay_loop } else { &counters.relay_prmfail };
                        crate::metrics::add(kind, 1);
                        crate::metrics::dequeued(1);
                        tracing::info!(
                            "queue id={id} to=<{}> result=failed status={status} error={diagnostic}",
                            r.address
                        );
                        failed.push(bounce::failed(&r, &status, &diagnostic, mta.as_deref()));
                    }
                }
            }
        }
        entry.recipients = remaining;
        entry.attempts += 1;
        let now = chrono::Utc::now().timestamp();
        entry.next_attempt = schedule::next_attempt(now, entry.attempts, &self.settings);
        // The bounce is stored before the recipients leave the entry: a crash in between
        // repeats the bounce rather than losing it.
        if let Err(e) = self.bounce(&entry, &failed).await {
            tracing::error!("queue id={id} cannot store the bounce error={e}; will retry");
            entry.recipients.extend(failed.iter().map(|f| {
                let mut r = QueueRecipient::new(f.final_recipient.clone());
                r.original = f.original_recipient.clone();
                r
            }));
        }
        if !entry.recipients.is_empty() && schedule::warning_due(entry.created, now, entry.warned, &self.settings) {
            let until = schedule::give_up_at(entry.created, &self.settings);
            let delayed: Vec<_> = entry.recipients.iter().map(|r| bounce::delayed(r, until)).collect();
            match self.bounce(&entry, &delayed).await {
                Ok(_) => entry.warned = true,
                Err(e) => tracing::error!("queue id={id} cannot store the delay warning error={e}"),
            }
        }
        if let Err(e) = self.store.queue_update(&entry) {
            tracing::error!("queue id={id} cannot record the attempt error={e}");
        }
        failed_before && delivered > 0
    }

    /// The lifetime is over: bounce every recipient left, with the last error seen.
    async fn expire(&self, entry: QueueEntry) {
        let id = entry.display_id();
        let failed: Vec<_> = entry
            .recipients
            .iter()
            .map(|r| {
                let why = r.last_error.as_deref().unwrap_or("no delivery attempt succeeded");
                bounce::failed(r, "4.4.7", &format!("delivery time expired; last error: {why}"), None)
            })
            .collect();
        tracing::info!("queue id={id} expired recipients={}", failed.len());
        if let Err(e) = self.bounce(&entry, &failed).await {
            tracing::error!("queue id={id} cannot store the bounce error={e}; will retry");
            return;
        }
        crate::metrics::add(&crate::metrics::counters().relay_expire, failed.len());
        crate::metrics::dequeued(failed.len());
        let mut done = entry;
        done.recipients.clear();
        if let Err(e) = self.store.queue_update(&done) {
            tracing::error!("queue id={id} cannot remove the expired entry error={e}");
        }
    }

    async fn deliver_group(&self, entry: &QueueEntry, dest: &Destination, rcpts: &[QueueRecipient]) -> Vec<Outcome> {
        let n = rcpts.len();
        let hosts = match dest {
            Destination::Relay(route) => match self.relay_hosts(route).await {
                Ok(hosts) => hosts,
                Err(e) => return all(n, || Outcome::Deferred(format!("relay {}: {e}", route.host))),
            },
            Destination::Mx(domain) => match self.resolver.mx_plan(domain).await {
                Ok(plan) => plan.into_iter().map(|mx| (mx.name, mx.addresses, self.settings.mx_port)).collect(),
                Err(DnsError::NullMx) => {
                    let why = format!("{domain} does not accept mail (null MX, RFC 7505)");
                    return all(n, || Outcome::Failed("5.1.10".into(), why.clone(), None));
                }
                Err(DnsError::NoSuchDomain) => {
                    let why = format!("{domain}: no such domain");
                    return all(n, || Outcome::Failed("5.1.2".into(), why.clone(), None));
                }
                Err(e) => return all(n, || Outcome::Deferred(format!("DNS lookup for {domain}: {e}"))),
            },
            Destination::Cluster(domain) => match self.backup_hops(domain).await {
                Ok(hops) => hops,
                Err(why) => return all(n, || Outcome::Looped(why.clone())),
            },
        };
        let key = dest.key();
        let mut last_error = format!(
            "no usable host for {}",
            match dest {
                Destination::Relay(r) => r.host.as_str(),
                Destination::Mx(d) | Destination::Cluster(d) => d.as_str(),
            }
        );
        let mut only_ourselves = !hosts.is_empty();
        // A pooled session first: it is to one of these hosts already.
        if let Some(pooled) = self.pool.take(&key) {
            match self.transact(entry, rcpts, pooled, &key).await {
                Ok(outcomes) => return outcomes,
                Err(e) => last_error = e,
            }
        }
        for (host, addresses, port) in &hosts {
            if addresses.is_empty() {
                tracing::info!("queue id={} mx={host} skipped: no addresses", entry.display_id());
                continue;
            }
            for ip in addresses {
                let addr = SocketAddr::new(*ip, *port);
                if self.is_own_address(addr) {
                    continue;
                }
                only_ourselves = false;
                let client = match SmtpClient::connect(addr, host, &self.client_config(dest, host)).await {
                    Ok(c) => c,
                    Err(e) if e.is_permanent() => {
                        // A 5xx greeting or EHLO, or a refused AUTH at our smarthost.
                        return all(n, || Outcome::Failed(status_of(&e), e.to_string(), Some(host.clone())));
                    }
                    Err(e) => {
                        tracing::info!("queue id={} host={host} addr={addr} error={e}", entry.display_id());
                        last_error = format!("{host}[{ip}]: {e}");
                        continue;
                    }
                };
                if client.greeting_name() == self.hostname && !matches!(dest, Destination::Relay(_)) {
                    client.quit().await;
                    last_error = format!("{host}[{ip}] greets as {}: that is us", self.hostname);
                    continue;
                }
                match self.transact(entry, rcpts, Pooled { client, uses: 0 }, &key).await {
                    Ok(outcomes) => return outcomes,
                    Err(e) => last_error = e,
                }
            }
        }
        if only_ourselves {
            // RFC 5321 §5.1: the best MX is this host and nothing better exists.
            let why = "mail for this domain loops back to myself".to_string();
            return all(n, || Outcome::Failed("5.4.6".into(), why.clone(), None));
        }
        all(n, || Outcome::Deferred(last_error.clone()))
    }

    /// One transaction on an open session. `Err` means "try the next host" (the session broke
    /// or the server deferred the whole transaction); per-recipient results are `Ok`.
    async fn transact(
        &self,
        entry: &QueueEntry,
        rcpts: &[QueueRecipient],
        mut pooled: Pooled,
        key: &str,
    ) -> Result<Vec<Outcome>, String> {
        let id = entry.display_id();
        let recipients: Vec<String> = rcpts.iter().map(|r| r.address.clone()).collect();
        let env = Envelope {
            from: &entry.from,
            recipients: &recipients,
            size: entry.size,
            eight_bit: entry.eight_bit,
            smtputf8: entry.smtputf8,
        };
        let body = match self.store.read_blob(&entry.blob) {
            Ok(Some(reader)) => WithoutReturnPath::new(reader),
            Ok(None) => {
                tracing::error!("queue id={id} body missing from the store");
                return Ok(all(rcpts.len(), || {
                    Outcome::Failed("4.3.0".into(), "message body lost in the local store".into(), None)
                }));
            }
            Err(e) => return Err(format!("reading the body: {e}")),
        };
        let host = pooled.client.peer();
        let result = pooled.client.send(&env, body).await;
        match result {
            Ok(report) => {
                log_report(&id, &entry.from, &recipients, &report);
                let outcomes = outcomes(&report);
                self.pool.put(key, pooled).await;
                Ok(outcomes)
            }
            Err(e) if e.is_permanent() => {
                let mta = pooled.client.peer().ip().to_string();
                let status = status_of(&e);
                let why = e.to_string();
                self.pool.put(key, pooled).await;
                Ok(all(rcpts.len(), || Outcome::Failed(status.clone(), why.clone(), Some(mta.clone()))))
            }
            Err(e) => {
                tracing::info!("queue id={id} addr={host} error={e}");
                self.pool.put(key, pooled).await;
                Err(format!("{host}: {e}"))
            }
        }
    }

    fn client_config(&self, dest: &Destination, host: &str) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.hostname.clone(), self.roots.clone());
        cfg.connect_timeout = self.settings.connect_timeout;
        // Another node of ours: STARTTLS and the cluster secret, whatever the route.
        if let Some(secret) = self.cluster.secret.as_ref().filter(|_| self.cluster.is_peer_host(host)) {
            cfg.tls = TlsPolicy::Cluster;
            cfg.cluster = Some((self.cluster.node.clone(), secret.clone()));
            return cfg;
        }
        if let Destination::Relay(route) = dest {
            cfg.tls = match route.tls {
                RelayTls::Implicit => TlsPolicy::Implicit,
                RelayTls::StartTlsRequired => TlsPolicy::Required,
                RelayTls::Opportunistic => TlsPolicy::Opportunistic,
            };
            if let (Some(user), Some(password)) = (&route.user, &route.password) {
                cfg.auth = Some((user.clone(), password.0.clone()));
            }
        }
        cfg
    }

    async fn relay_hosts(&self, route: &RelayRoute) -> Result<Vec<(String, Vec<IpAddr>, u16)>, DnsError> {
        let addresses = match route.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.resolver.addresses(&route.host).await?,
        };
        Ok(vec![(route.host.clone(), addresses, route.port)])
    }

    /// One of our own SMTP listeners: delivering there would loop.
    pub(super) fn is_own_address(&self, addr: SocketAddr) -> bool {
        self.own_addresses.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified() && (addr.ip().is_loopback() || self.local_ips.contains(&addr.ip()))))
        })
    }
}

/// The enhanced status for a whole-transaction failure.
fn status_of(e: &SessionError) -> String {
    match e {
        SessionError::Rejected { reply, .. } => {
            reply.enhanced.clone().unwrap_or_else(|| if reply.is_permanent() { "5.0.0" } else { "4.0.0" }.into())
        }
        SessionError::Unsupported(_) => "5.3.3".into(),
        SessionError::Envelope(_) => "5.1.3".into(),
        _ => "4.4.1".into(),
    }
}

fn outcomes(report: &DeliveryReport) -> Vec<Outcome> {
    let mta = report.host.clone();
    report
        .recipients
        .iter()
        .map(|o| match o {
            RcptOutcome::Accepted => Outcome::Delivered,
            RcptOutcome::Temporary(reply) => Outcome::Deferred(format!("{mta}: {reply}")),
            RcptOutcome::Permanent(reply) => Outcome::Failed(
                reply.enhanced.clone().unwrap_or_else(|| "5.0.0".into()),
                reply.to_string(),
                Some(mta.clone()),
            ),
        })
        .collect()
}

fn log_report(id: &str, from: &str, recipients: &[String], report: &DeliveryReport) {
    let tls = match &report.tls {
        Some(t) if t.verified => format!("{} {} verified", t.version, t.cipher),
        Some(t) => format!(
            "{} {} unverified ({})",
            t.version,
            t.cipher,
            t.verify_error.as_deref().unwrap_or("certificate not checked")
        ),
        None => "none".into(),
    };
    for (rcpt, outcome) in recipients.iter().zip(&report.recipients) {
        let result = match outcome {
            RcptOutcome::Accepted => "Ok".to_string(),
            RcptOutcome::Temporary(r) => format!("TempFail ({r})"),
            RcptOutcome::Permanent(r) => format!("PermFail ({r})"),
        };
        let reply = report.data_reply.as_ref().map(|r| r.to_string()).unwrap_or_default();
        tracing::info!(
            "queue id={id} from=<{from}> to=<{rcpt}> relay={}[{}] tls=\"{tls}\" result={result} reply=\"{reply}\"",
            report.host,
            report.peer.ip()
        );
    }
}

/// The stored body minus its first line when that is `Return-Path:`: the session wrote one
/// for local copies, and RFC 5321 §4.4 forbids sending it on to another server.
struct WithoutReturnPath<R> {
    inner: R,
    first: bool,
}

impl<R> WithoutReturnPath<R> {
    fn new(inner: R) -> Self {
        WithoutReturnPath { inner, first: true }
    }
}

impl<R: ChunkSource> ChunkSource for WithoutReturnPath<R> {
    type Chunk = Vec<u8>;
    fn next_chunk(&mut self) -> Option<io::Result<Vec<u8>>> {
        let chunk = match self.inner.next_chunk()? {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let bytes = chunk.as_ref();
        if std::mem::take(&mut self.first) && bytes.len() >= 12 && bytes[..12].eq_ignore_ascii_case(b"return-path:") {
            // Trace headers are one line each and written whole into the first chunk.
            if let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") {
                return Some(Ok(bytes[end + 2..].to_vec()));
            }
        }
        Some(Ok(bytes.to_vec()))
    }
}
