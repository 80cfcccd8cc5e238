//! The outbound queue: everything that leaves the node (submissions, forwards, bounces) waits
//! here, durably, until a remote server takes it or it comes back as a bounce.
//!
//! * [`Queue::accept`] is where an SMTP session hands over a message: local copies and the
//!   queue entry are committed in one batch and flushed before the session says 250.
//! * [`Queue::run`] is the scheduler. It keeps in memory only the ids being delivered right
//!   now (at most `max_connections`); what is due comes from the store's due-time index, a few
//!   entries at a time, so 100,000 queued messages cost no more memory than ten.
//! * `attempt` delivers one entry (routes, MX, connection reuse); `bounce` writes DSNs;
//!   `schedule` computes retry times.
//!
//! Delivery is at least once: a recipient is removed from its entry only after the remote
//! server said 250 and the removal is written. A crash between the two sends that recipient
//! the message again (a duplicate), never loses it.

mod attempt;
mod backup;
mod bounce;
mod pool;
pub mod schedule;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::config::OutboundSettings;
use crate::dns::Resolver;
use crate::routing::Router;
use crate::store::{DeliveryTarget, MessageMeta, NewQueued, PendingBlob, QueueEntry, Store, StoreError, Stored};

pub use attempt::Destination;
pub use backup::ClusterView;

/// Shared by sessions (to enqueue), the scheduler (to deliver) and the control socket.
pub struct Queue {
    store: Arc<Store>,
    settings: OutboundSettings,
    hostname: String,
    router: Arc<Router>,
    resolver: Resolver,
    roots: Arc<rustls::RootCertStore>,
    /// Wakes the scheduler: new mail, `queue retry`, a finished delivery.
    wake: Notify,
    /// Entries being delivered now: the scheduler never starts a second attempt on one.
    in_flight: Mutex<HashSet<u64>>,
    /// Per destination, deliveries in progress (bounded by `max_connections_per_domain`).
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    pool: pool::Pool,
    /// Our own SMTP listener addresses: an MX that resolves to one of them is a loop.
    own_addresses: Vec<std::net::SocketAddr>,
    /// Signs the DSNs the queue writes (their From is MAILER-DAEMON@hostname).
    dkim: Option<Arc<crate::dkim::Signer>>,
    /// This node's place in the cluster: a backup relays its domains to the primaries.
    cluster: ClusterView,
    /// The machine's interface addresses, when a listener is on a wildcard address: an MX that
    /// resolves to one of them is this node.
    local_ips: Vec<std::net::IpAddr>,
    /// The last time a delivery that had failed before got through and made every deferred
    /// entry due (at most once per `run_interval`).
    last_recovery: Mutex<Option<std::time::Instant>>,
    /// With `[sync]`: `accept` waits for a peer's durable ack of local copies (issue 8).
    replication: std::sync::OnceLock<Arc<crate::sync::durable::Replication>>,
}

/// A message leaving a session: where its copies go.
pub struct Incoming<'a> {
    /// Reverse path without brackets ("" for the null sender).
    pub from: &'a str,
    /// The reverse path of the queue entry when it differs from `from` (SRS for forwards).
    pub remote_from: Option<String>,
    pub local: Vec<DeliveryTarget<'a>>,
    pub remote: Vec<crate::store::QueueRecipient>,
    pub smtputf8: bool,
    /// For `queue list` and logs, e.g. "submission alice@example.org" or "forward".
    pub origin: String,
}

impl Queue {
    pub fn new(
        store: Arc<Store>,
        settings: OutboundSettings,
        hostname: String,
        router: Arc<Router>,
        resolver: Resolver,
        dkim: Option<Arc<crate::dkim::Signer>>,
        cluster: ClusterView,
    ) -> anyhow::Result<Arc<Queue>> {
        let roots = Arc::new(trust_anchors(settings.ca_file.as_deref())?);
        let own_addresses = cluster.own_smtp.clone();
        let local_ips = if own_addresses.iter().any(|a| a.ip().is_unspecified()) {
            crate::net::interface_addresses()
        } else {
            Vec::new()
        };
        // The envelope gauge starts from what a previous run left in the queue.
        let mut queued = 0;
        let mut after = None;
        loop {
            let page = store.queue_list(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            queued += page.iter().map(|e| e.recipients.len()).sum::<usize>();
        }
        crate::metrics::counters().envelopes_current.store(queued as i64, std::sync::atomic::Ordering::Relaxed);
        Ok(Arc::new(Queue {
            store,
            settings,
            hostname,
            router,
            resolver,
            roots,
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            per_destination: Mutex::new(HashMap::new()),
            pool: pool::Pool::default(),
            own_addresses,
            dkim,
            cluster,
            local_ips,
            last_recovery: Mutex::new(None),
            replication: std::sync::OnceLock::new(),
        }))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Turns on the durable-ack wait of `accept` (once, at start).
    pub fn set_replication(&self, replication: Arc<crate::sync::durable::Replication>) {
        let _ = self.replication.set(replication);
    }

    pub fn settings(&self) -> &OutboundSettings {
        &self.settings
    }

    /// Stores local copies and queues remote recipients in one atomic commit, and returns once
    /// it is on disk: only then may the session answer 250. With `[sync]` it also waits, at
    /// most `ack_timeout`, until a peer holds the local copies durably (plan §4); SMTP, LMTP
    /// and the backup MX hop all come through here. Queued remote copies are not replicated.
    pub async fn accept(&self, blob: PendingBlob, msg: Incoming<'_>) -> Result<(Vec<Stored>, Option<u64>), StoreError> {
        let queued = (!msg.remote.is_empty()).then(|| NewQueued {
            from: msg.remote_from.unwrap_or_else(|| msg.from.to_string()),
            recipients: msg.remote,
            smtputf8: msg.smtputf8,
            origin: msg.origin,
        });
        let now = chrono::Utc::now().timestamp();
        let meta = MessageMeta { flags: Default::default(), keywords: &[], internal_date: now, tz_offset_minutes: 0 };
        let (n_local, n_remote) = (msg.local.len(), queued.as_ref().map_or(0, |q| q.recipients.len()));
        let result = self.store.commit_with_queue(blob, &msg.local, &meta, queued)?;
        self.store.sync().await?;
        if let Some(r) = self.replication.get() {
            let placed: Vec<(u32, u32, u32)> = result.0.iter().map(|s| (s.account, s.mailbox, s.uid)).collect();
            if !placed.is_empty() {
                r.wait_stored(&placed).await;
            }
        }
        // Local copies count as enqueued and delivered at once, as OpenSMTPD's local deliveries.
        let counters = crate::metrics::counters();
        crate::metrics::add(&counters.envelopes_enqueued, n_local);
        crate::metrics::add(&counters.envelopes_dequeued, n_local);
        crate::metrics::add(&counters.relay_ok, n_local);
        crate::metrics::enqueued(n_remote);
        if result.1.is_some() {
            self.wake.notify_one();
        }
        Ok(result)
    }

    /// Makes one entry (or, with `None`, every entry) due now. Returns how many were found.
    pub fn retry(&self, id: Option<u64>) -> Result<usize, StoreError> {
        let now = chrono::Utc::now().timestamp();
        let n = match id {
            Some(id) => usize::from(self.store.queue_schedule_now(id, now)?.is_some()),
            None => {
                let mut n = 0;
                let mut after = None;
                loop {
                    let page = self.store.queue_list(after, 1000)?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.id);
                    for e in &page {
                        if !e.held && self.store.queue_schedule_now(e.id, now)?.is_some() {
                            n += 1;
                        }
                    }
                }
                n
            }
        };
        self.wake.notify_one();
        Ok(n)
    }

    /// Holds or releases an entry (`None` when there is no such entry).
    pub fn hold(&self, id: u64, held: bool) -> Result<Option<QueueEntry>, StoreError> {
        let now = chrono::Utc::now().timestamp();
        let entry = self.store.queue_set_held(id, held, now)?;
        if !held {
            self.wake.notify_one();
        }
        Ok(entry)
    }

    /// Removes an entry; with `bounce`, its sender gets a DSN saying it was deleted by the
    /// administrator (RFC 3463 5.3.0). Returns the entry (`None` when there is no such entry)
    /// and whether a DSN was queued (none for a null sender or an automatic report).
    pub async fn remove(&self, id: u64, bounce: bool) -> Result<Option<(QueueEntry, bool)>, StoreError> {
        let Some(entry) = self.store.queue_get(id)? else { return Ok(None) };
        let mut bounced = false;
        if bounce {
            let failed: Vec<_> = entry
                .recipients
                .iter()
                .map(|r| bounce::failed(r, "5.3.0", "deleted from the queue by the administrator", None))
                .collect();
            bounced = self.bounce(&entry, &failed).await?;
        }
        let removed = self.store.queue_remove(id)?;
        self.store.sync().await?;
        if let Some(e) = &removed {
            crate::metrics::add(&crate::metrics::counters().relay_remove, e.recipients.len());
            crate::metrics::dequeued(e.recipients.len());
        }
        tracing::info!("queue removed id={} bounce={bounced}", crate::store::queue::format_id(id));
        Ok(removed.map(|e| (e, bounced)))
    }

    /// Ids being delivered at this moment.
    pub fn in_flight(&self) -> Vec<u64> {
        self.in_flight.lock().expect("queue lock").iter().copied().collect()
    }

    /// The scheduler: starts due deliveries up to the concurrency limit, then sleeps until the
    /// next entry is due, new mail arrives, or a delivery finishes. Runs until the task is
    /// dropped.
    pub async fn run(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(self.settings.max_connections));
        let mut reap = tokio::time::interval(Duration::from_secs(5));
        // The queue run (backup MX): one deferred entry tried early, to notice a peer is back.
        let mut queue_run = tokio::time::interval(self.settings.run_interval.unwrap_or(Duration::from_secs(3600)));
        queue_run.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        queue_run.reset();
        loop {
            let free = slots.available_permits();
            let now = chrono::Utc::now().timestamp();
            let due = if free > 0 {
                let in_flight = self.in_flight.lock().expect("queue lock").clone();
                match self.store.queue_due(now, free, |id| in_flight.contains(&id)) {
                    Ok(due) => due,
                    Err(e) => {
                        tracing::error!("queue cannot read the queue error={e}");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            for entry in due {
                let Ok(permit) = slots.clone().try_acquire_owned() else { break };
                self.in_flight.lock().expect("queue lock").insert(entry.id);
                let queue = self.clone();
                tokio::spawn(async move {
                    let id = entry.id;
                    let recovered = queue.deliver(entry).await;
                    queue.in_flight.lock().expect("queue lock").remove(&id);
                    drop(permit);
                    if recovered {
                        queue.recovered();
                    }
                    queue.wake.notify_one();
                });
            }
            let sleep = self.time_to_next_due(now);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = reap.tick() => {
                    self.pool.reap().await;
                    self.per_destination.lock().expect("queue lock").retain(|_, s| Arc::strong_count(s) > 1);
                }
                _ = queue_run.tick(), if self.settings.run_interval.is_some() => self.queue_run(),
            }
        }
    }

    /// Makes the oldest deferred entry due now. When it gets through, `recovered` brings the
    /// rest: a backup notices its primary is back within one run, however long the backoff.
    fn queue_run(&self) {
        let now = chrono::Utc::now().timestamp();
        let in_flight = self.in_flight.lock().expect("queue lock").clone();
        let oldest = match self.store.queue_list(None, 256) {
            Ok(page) => page.into_iter().find(|e| !e.held && e.next_attempt > now && !in_flight.contains(&e.id)),
            Err(e) => {
                tracing::error!("queue cannot read the queue error={e}");
                return;
            }
        };
        if let Some(entry) = oldest {
            tracing::debug!("queue run: trying id={} early", entry.display_id());
            if let Err(e) = self.store.queue_schedule_now(entry.id, now) {
                tracing::error!("queue cannot schedule id={} error={e}", entry.display_id());
            }
            self.wake.notify_one();
        }
    }

    /// A delivery that had failed before got through: the way out is open again, so every
    /// deferred entry is due now, oldest first (the due index orders equal times by id, which
    /// is arrival order). Only with queue runs, and at most once per run.
    fn recovered(&self) {
        let Some(every) = self.settings.run_interval else { return };
        {
            let mut last = self.last_recovery.lock().expect("queue lock");
            if last.is_some_and(|t| t.elapsed() < every) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        match self.retry(None) {
            Ok(n) if n > 0 => tracing::info!("queue delivery works again: {n} deferred message(s) due now"),
            Ok(_) => {}
            Err(e) => tracing::error!("queue cannot reschedule error={e}"),
        }
    }

    /// How long until the earliest entry not being delivered is due (at most a minute, so a
    /// clock jump cannot stall the queue for long).
    fn time_to_next_due(&self, now: i64) -> Duration {
        let in_flight = self.in_flight.lock().expect("queue lock").clone();
        let next = self.store.queue_next_due(|id| in_flight.contains(&id)).ok().flatten();
        match next {
            Some(due) if due <= now => Duration::from_millis(200),
            Some(due) => Duration::from_secs((due - now) as u64).min(Duration::from_secs(60)),
            None => Duration::from_secs(60),
        }
    }

    /// The semaphore that bounds deliveries to one destination.
    fn destination_slots(&self, key: &str) -> Arc<Semaphore> {
        let mut map = self.per_destination.lock().expect("queue lock");
        map.entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_connections_per_domain)))
            .clone()
    }
}

/// The platform's trust anchors (webpki-roots are not a dependency: Debian's bundle is the
/// operator's choice) plus `ca_file`.
fn trust_anchors(extra: Option<&std::path::Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for path in ["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"] {
        if let Ok(pem) = std::fs::read(path) {
            for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                let _ = roots.add(cert);
            }
            break;
        }
    }
    if let Some(path) = extra {
        let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert?)?;
        }
    }
    Ok(roots)
}
