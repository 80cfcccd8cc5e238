//! The node's activity counters: what `postern monitor` prints each second (the columns of
//! OpenSMTPD's `smtpctl monitor`) and what the optional `listen.metrics` endpoint exports in
//! the Prometheus text format.
//!
//! Counters are process-wide atomics: one process runs one node, and a counter bump must cost
//! nothing on the delivery path. An envelope is one recipient of one message, as in OpenSMTPD.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Monotonic counters plus two gauges (`*_current`).
#[derive(Default)]
pub struct Counters {
    pub clients_current: AtomicI64,
    pub clients_connected: AtomicU64,
    pub clients_disconnected: AtomicU64,
    pub envelopes_current: AtomicI64,
    pub envelopes_enqueued: AtomicU64,
    pub envelopes_dequeued: AtomicU64,
    /// Delivered (remote 250, or stored in a local mailbox).
    pub relay_ok: AtomicU64,
    /// Deferred: tried, will try again.
    pub relay_tmpfail: AtomicU64,
    /// Refused for good: bounced to the sender.
    pub relay_prmfail: AtomicU64,
    /// Mail that would come back to this node (RFC 5321 §5.1): refused or held.
    pub relay_loop: AtomicU64,
    /// Bounced after the queue lifetime.
    pub relay_expire: AtomicU64,
    /// Deleted by the administrator.
    pub relay_remove: AtomicU64,
    /// Delivery status notifications written.
    pub relay_bounce: AtomicU64,
}

static COUNTERS: Counters = Counters {
    clients_current: AtomicI64::new(0),
    clients_connected: AtomicU64::new(0),
    clients_disconnected: AtomicU64::new(0),
    envelopes_current: AtomicI64::new(0),
    envelopes_enqueued: AtomicU64::new(0),
    envelopes_dequeued: AtomicU64::new(0),
    relay_ok: AtomicU64::new(0),
    relay_tmpfail: AtomicU64::new(0),
    relay_prmfail: AtomicU64::new(0),
    relay_loop: AtomicU64::new(0),
    relay_expire: AtomicU64::new(0),
    relay_remove: AtomicU64::new(0),
    relay_bounce: AtomicU64::new(0),
};

pub fn counters() -> &'static Counters {
    &COUNTERS
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

/// Envelopes leaving the queue (delivered, bounced, expired or removed).
pub fn dequeued(n: usize) {
    add(&COUNTERS.envelopes_dequeued, n);
    COUNTERS.envelopes_current.fetch_sub(n as i64, Relaxed);
}

/// Envelopes entering the queue.
pub fn enqueued(n: usize) {
    add(&COUNTERS.envelopes_enqueued, n);
    COUNTERS.envelopes_current.fetch_add(n as i64, Relaxed);
}

/// Counts one SMTP client for as long as it lives.
pub struct ClientGuard(());

impl ClientGuard {
    pub fn enter() -> ClientGuard {
        COUNTERS.clients_connected.fetch_add(1, Relaxed);
        COUNTERS.clients_current.fetch_add(1, Relaxed);
        ClientGuard(())
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        COUNTERS.clients_disconnected.fetch_add(1, Relaxed);
        COUNTERS.clients_current.fetch_sub(1, Relaxed);
    }
}

/// A copy of every counter at one moment, as the control socket sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub clients_current: i64,
    pub clients_connected: u64,
    pub clients_disconnected: u64,
    pub envelopes_current: i64,
    pub envelopes_enqueued: u64,
    pub envelopes_dequeued: u64,
    pub relay_ok: u64,
    pub relay_tmpfail: u64,
    pub relay_prmfail: u64,
    pub relay_loop: u64,
    pub relay_expire: u64,
    pub relay_remove: u64,
    pub relay_bounce: u64,
    /// Queue entries (messages) and the age of the oldest, in seconds.
    #[serde(default)]
    pub queue_messages: u64,
    #[serde(default)]
    pub queue_oldest_age: u64,
    /// Whether `postern pause smtp` is in effect.
    #[serde(default)]
    pub smtp_paused: bool,
    /// Replication peers; empty when replication is off.
    #[serde(default)]
    pub sync_peers: Vec<SyncPeer>,
    /// Deliveries acknowledged without a peer's durable ack that no peer has acked since.
    #[serde(default)]
    pub sync_under_replicated: Option<u64>,
}

/// One replication peer's gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPeer {
    pub peer: String,
    pub connected: bool,
    pub config_mismatch: bool,
    /// Records the peer has not acknowledged, and the age of the oldest; `None` until the peer
    /// said what it holds.
    #[serde(default)]
    pub lag_changes: Option<u64>,
    #[serde(default)]
    pub lag_seconds: Option<u64>,
}

impl SyncPeer {
    /// From the replication view (`durable::Replication::view`).
    pub fn from_view(view: &crate::sync::SyncView) -> Vec<SyncPeer> {
        use crate::sync::status::PeerState;
        view.peers
            .iter()
            .map(|p| SyncPeer {
                connected: p.state == PeerState::Connected,
                config_mismatch: p.state == PeerState::ConfigMismatch,
                peer: p.peer.clone(),
                lag_changes: p.lag_changes,
                lag_seconds: p.lag_seconds,
            })
            .collect()
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped (exposition format).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Snapshot {
    pub fn now() -> Snapshot {
        let c = &COUNTERS;
        Snapshot {
            clients_current: c.clients_current.load(Relaxed),
            clients_connected: c.clients_connected.load(Relaxed),
            clients_disconnected: c.clients_disconnected.load(Relaxed),
            envelopes_current: c.envelopes_current.load(Relaxed).max(0),
            envelopes_enqueued: c.envelopes_enqueued.load(Relaxed),
            envelopes_dequeued: c.envelopes_dequeued.load(Relaxed),
            relay_ok: c.relay_ok.load(Relaxed),
            relay_tmpfail: c.relay_tmpfail.load(Relaxed),
            relay_prmfail: c.relay_prmfail.load(Relaxed),
            relay_loop: c.relay_loop.load(Relaxed),
            relay_expire: c.relay_expire.load(Relaxed),
            relay_remove: c.relay_remove.load(Relaxed),
            relay_bounce: c.relay_bounce.load(Relaxed),
            ..Snapshot::default()
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            let _ = writeln!(out, "# HELP postern_{name} {help}\n# TYPE postern_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "postern_{name}{labels} {value}");
            }
        };
        metric("smtp_sessions", "gauge", "SMTP sessions open now.", &[("", self.clients_current.to_string())]);
        metric(
            "smtp_connections_total",
            "counter",
            "SMTP connections accepted.",
            &[("", self.clients_connected.to_string())],
        );
        metric(
            "smtp_disconnections_total",
            "counter",
            "SMTP sessions ended.",
            &[("", self.clients_disconnected.to_string())],
        );
        metric(
            "smtp_paused",
            "gauge",
            "1 while new SMTP sessions are refused (postern pause smtp).",
            &[("", u8::from(self.smtp_paused).to_string())],
        );
        metric(
            "queue_envelopes",
            "gauge",
            "Recipients waiting in the queue.",
            &[("", self.envelopes_current.to_string())],
        );
        metric("queue_messages", "gauge", "Messages in the queue.", &[("", self.queue_messages.to_string())]);
        metric(
            "queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest queued message.",
            &[("", self.queue_oldest_age.to_string())],
        );
        metric(
            "envelopes_enqueued_total",
            "counter",
            "Envelopes accepted (one per recipient).",
            &[("", self.envelopes_enqueued.to_string())],
        );
        metric(
            "envelopes_dequeued_total",
            "counter",
            "Envelopes finished: delivered, bounced, expired or removed.",
            &[("", self.envelopes_dequeued.to_string())],
        );
        let results = [
            ("ok", self.relay_ok),
            ("tmpfail", self.relay_tmpfail),
            ("prmfail", self.relay_prmfail),
            ("loop", self.relay_loop),
            ("expire", self.relay_expire),
            ("remove", self.relay_remove),
            ("bounce", self.relay_bounce),
        ];
        let samples: Vec<(String, String)> =
            results.iter().map(|(r, v)| (format!("{{result=\"{r}\"}}"), v.to_string())).collect();
        let samples: Vec<(&str, String)> = samples.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        metric(
            "delivery_total",
            "counter",
            "Delivery outcomes per envelope, as smtpctl monitor counts them.",
            &samples,
        );
        if !self.sync_peers.is_empty() {
            let gauge = |f: fn(&SyncPeer) -> bool| -> Vec<(String, String)> {
                let label = |p: &SyncPeer| format!("{{peer=\"{}\"}}", label_value(&p.peer));
                self.sync_peers.iter().map(|p| (label(p), u8::from(f(p)).to_string())).collect()
            };
            let connected = gauge(|p| p.connected);
            let connected: Vec<(&str, String)> = connected.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
            metric(
                "sync_peer_connected",
                "gauge",
                "1 while both replication links with the peer are up and agree on the config.",
                &connected,
            );
            let mismatch = gauge(|p| p.config_mismatch);
            let mismatch: Vec<(&str, String)> = mismatch.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
            metric(
                "sync_config_mismatch",
                "gauge",
                "1 while the peer's config fingerprint differs from this node's (no replication).",
                &mismatch,
            );
            // Peers that never said what they hold have no lag sample rather than a made-up one.
            let lag = |f: fn(&SyncPeer) -> Option<u64>| -> Vec<(String, String)> {
                let label = |p: &SyncPeer| format!("{{peer=\"{}\"}}", label_value(&p.peer));
                self.sync_peers.iter().filter_map(|p| Some((label(p), f(p)?.to_string()))).collect()
            };
            let changes = lag(|p| p.lag_changes);
            let changes: Vec<(&str, String)> = changes.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
            metric(
                "sync_lag_changes",
                "gauge",
                "Records this node holds that the peer has not durably acknowledged (counted up to 10000).",
                &changes,
            );
            let seconds = lag(|p| p.lag_seconds);
            let seconds: Vec<(&str, String)> = seconds.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
            metric(
                "sync_lag_seconds",
                "gauge",
                "Age of the oldest record the peer has not durably acknowledged.",
                &seconds,
            );
        }
        if let Some(n) = self.sync_under_replicated {
            metric(
                "sync_under_replicated",
                "gauge",
                "Deliveries acknowledged without a peer's durable ack (timeout or no peer) not acked by a peer since.",
                &[("", n.to_string())],
            );
        }
        out
    }
}

/// The header of `postern monitor`, as `smtpctl monitor` prints it.
pub const MONITOR_HEADER: &str = "--- client --- -- envelope -- ---- relay/delivery --- ------- misc -------\n\
                                  curr conn disc curr enq deq ok tmpfail prmfail loop expire remove bounce";

/// One monitor line: the gauges as they are, the counters as the change since `before`.
pub fn monitor_line(before: &Snapshot, now: &Snapshot) -> String {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    format!(
        "{} {} {} {} {} {} {} {} {} {} {} {} {}",
        now.clients_current,
        d(now.clients_connected, before.clients_connected),
        d(now.clients_disconnected, before.clients_disconnected),
        now.envelopes_current,
        d(now.envelopes_enqueued, before.envelopes_enqueued),
        d(now.envelopes_dequeued, before.envelopes_dequeued),
        d(now.relay_ok, before.relay_ok),
        d(now.relay_tmpfail, before.relay_tmpfail),
        d(now.relay_prmfail, before.relay_prmfail),
        d(now.relay_loop, before.relay_loop),
        d(now.relay_expire, before.relay_expire),
        d(now.relay_remove, before.relay_remove),
        d(now.relay_bounce, before.relay_bounce),
    )
}

/// Serves `GET /metrics` (HTTP/1.0 and 1.1, one request per connection). `snapshot` fills in
/// the figures that need the store.
pub async fn serve(listener: tokio::net::TcpListener, snapshot: impl Fn() -> Snapshot + Send + Sync + 'static) {
    use crate::net::http;
    let snapshot = std::sync::Arc::new(snapshot);
    let limiter = crate::net::ConnLimiter::new(8, 64);
    loop {
        let Ok((mut tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Some(guard) = limiter.acquire(peer.ip()) else { continue };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let Some((method, path)) = http::read_request(&mut tcp).await else { return };
            let head = method == "HEAD";
            const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
            match (method.as_str(), path.as_str()) {
                ("GET" | "HEAD", "/metrics") => {
                    http::respond(&mut tcp, head, "200 OK", TEXT, snapshot().prometheus().as_bytes()).await
                }
                ("GET" | "HEAD", _) => http::respond(&mut tcp, head, "404 Not Found", TEXT, b"try /metrics\n").await,
                _ => http::respond(&mut tcp, false, "405 Method Not Allowed", TEXT, b"only GET\n").await,
            }
            drop(guard);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_show_gauges_and_deltas() {
        let before = Snapshot { clients_connected: 3, relay_ok: 10, envelopes_current: 4, ..Snapshot::default() };
        let now = Snapshot {
            clients_current: 1,
            clients_connected: 4,
            envelopes_current: 2,
            relay_ok: 12,
            relay_loop: 1,
            ..Snapshot::default()
        };
        assert_eq!(monitor_line(&before, &now), "1 1 0 2 0 0 2 0 0 1 0 0 0");
        assert_eq!(MONITOR_HEADER.lines().nth(1).unwrap().split(' ').count(), 13);
    }

    #[test]
    fn prometheus_text_has_help_type_and_labels() {
        let s = Snapshot { relay_tmpfail: 5, queue_messages: 7, ..Snapshot::default() };
        let text = s.prometheus();
        assert!(text.contains("# TYPE postern_delivery_total counter\n"));
        assert!(text.contains("postern_delivery_total{result=\"tmpfail\"} 5\n"));
        assert!(text.contains("postern_queue_messages 7\n"));
        assert!(!text.contains("sync"), "no replication, no sync metrics");
        let peers = vec![
            SyncPeer {
                peer: "mail2".into(),
                connected: true,
                config_mismatch: false,
                lag_changes: Some(3),
                lag_seconds: Some(1),
            },
            SyncPeer { peer: "odd\"name".into(), connected: false, config_mismatch: true, ..SyncPeer::default() },
        ];
        let text = Snapshot { sync_peers: peers, sync_under_replicated: Some(2), ..Snapshot::default() }.prometheus();
        assert!(text.contains("postern_sync_peer_connected{peer=\"mail2\"} 1\n"), "{text}");
        assert!(text.contains("postern_sync_lag_changes{peer=\"mail2\"} 3\n"), "{text}");
        assert!(text.contains("postern_sync_lag_seconds{peer=\"mail2\"} 1\n"), "{text}");
        assert!(!text.contains("postern_sync_lag_changes{peer=\"odd"), "no sample before the peer said: {text}");
        assert!(text.contains("postern_sync_under_replicated 2\n"), "{text}");
        assert!(text.contains("postern_sync_config_mismatch{peer=\"odd\\\"name\"} 1\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("postern_") && value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
