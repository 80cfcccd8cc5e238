//! What `postern sync status` and the metrics endpoint show about each peer. The link tasks
//! write the peer table; readers take a copy, and `durable::Replication::view` adds the
//! measured figures (lag, the under-replicated count), and the pushing link records each
//! anti-entropy comparison.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A config mismatch is logged at most this often per peer: the dialler retries every 30 s at
/// most, and an operator needs the message, not a flood.
const MISMATCH_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Which of the two connections of a pair: the one this node dialled (it pushes on it) or the
/// one the peer dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Both connections are authenticated and agree on the config.
    Connected,
    /// Only the connection in one direction is up (the other is being redialled).
    OneWayIn,
    OneWayOut,
    Down,
    /// The peer's config fingerprint differs: no link is kept until one of the files changes.
    ConfigMismatch,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connected => "connected",
            PeerState::OneWayIn => "one-way (in)",
            PeerState::OneWayOut => "one-way (out)",
            PeerState::Down => "down",
            PeerState::ConfigMismatch => "config mismatch",
        }
    }
}

/// One peer as the control socket sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub peer: String,
    pub state: PeerState,
    /// Unix seconds when the peer entered `state` (the node's start when it never changed).
    pub since: i64,
    /// `None` until a HELLO was exchanged; then whether the fingerprints matched.
    pub config_match: Option<bool>,
    /// Unix seconds of the last frame received from the peer.
    pub last_contact: Option<i64>,
    /// Links established (both directions) and the last reason one ended or failed.
    pub connects: u64,
    pub last_error: Option<String>,
    /// The peer's fingerprint from its last HELLO (hex), shown on a mismatch.
    pub peer_fingerprint: Option<String>,
    /// Records this node holds that the peer has not durably acknowledged, summed over accounts
    /// and counted up to `durable::LAG_CAP` (`lag_capped` when there are more). `None` until the
    /// peer said what it holds, once since this node started.
    #[serde(default)]
    pub lag_changes: Option<u64>,
    #[serde(default)]
    pub lag_capped: bool,
    /// Age in seconds of the oldest of those records (0 when there is none).
    #[serde(default)]
    pub lag_seconds: Option<u64>,
    /// The last anti-entropy comparison with this peer: Unix seconds, and the counts of
    /// accounts found equal, repaired (local drift) and different (anomalies) since the pass
    /// began.
    #[serde(default)]
    pub anti_entropy: Option<(i64, crate::sync::engine::AuditSummary)>,
}

/// The whole answer of `sync_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncView {
    pub node: String,
    /// This node's config fingerprint (hex).
    pub config_fingerprint: String,
    /// The UID allocator preference (`[sync] order` resolved).
    pub order: Vec<String>,
    pub peers: Vec<PeerView>,
    /// Messages delivered (or appended) and answered without any peer's durable ack (timed out
    /// or no peer) that no peer has acknowledged since: the markers in the store, so the count
    /// survives a restart.
    #[serde(default)]
    pub under_replicated: u64,
}

#[derive(Debug)]
struct Peer {
    links_in: u32,
    links_out: u32,
    config_match: Option<bool>,
    state: PeerState,
    since: i64,
    last_contact: Option<i64>,
    connects: u64,
    last_error: Option<String>,
    peer_fingerprint: Option<String>,
    mismatch_logged: Option<Instant>,
    anti_entropy: Option<(i64, crate::sync::engine::AuditSummary)>,
}

impl Peer {
    fn update(&mut self) {
        let state = match (self.config_match, self.links_in > 0, self.links_out > 0) {
            (Some(false), _, _) => PeerState::ConfigMismatch,
            (_, true, true) => PeerState::Connected,
            (_, true, false) => PeerState::OneWayIn,
            (_, false, true) => PeerState::OneWayOut,
            (_, false, false) => PeerState::Down,
        };
        if state != self.state {
            self.state = state;
            self.since = now();
        }
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The peer table of one node.
#[derive(Debug)]
pub struct SyncStatus {
    node: String,
    fingerprint: [u8; 32],
    order: Vec<String>,
    peers: Mutex<BTreeMap<String, Peer>>,
}

impl SyncStatus {
    pub fn new(node: &str, fingerprint: [u8; 32], order: Vec<String>, peers: &[String]) -> SyncStatus {
        let start = now();
        let table = peers
            .iter()
            .map(|p| {
                let peer = Peer {
                    links_in: 0,
                    links_out: 0,
                    config_match: None,
                    state: PeerState::Down,
                    since: start,
                    last_contact: None,
                    connects: 0,
                    last_error: None,
                    peer_fingerprint: None,
                    mismatch_logged: None,
                    anti_entropy: None,
                };
                (p.clone(), peer)
            })
            .collect();
        SyncStatus { node: node.to_string(), fingerprint, order, peers: Mutex::new(table) }
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    fn with<T>(&self, peer: &str, f: impl FnOnce(&mut Peer) -> T) -> Option<T> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let p = peers.get_mut(peer)?;
        let out = f(p);
        p.update();
        Some(out)
    }

    /// A link passed HELLO with matching fingerprints.
    pub fn link_up(&self, peer: &str, dir: Direction, fingerprint: &[u8; 32]) {
        self.with(peer, |p| {
            match dir {
                Direction::In => p.links_in += 1,
                Direction::Out => p.links_out += 1,
            }
            p.config_match = Some(true);
            p.peer_fingerprint = Some(super::hex(fingerprint));
            p.connects += 1;
            p.last_contact = Some(now());
        });
    }

    /// A link that was up ended.
    pub fn link_down(&self, peer: &str, dir: Direction, reason: &str) {
        self.with(peer, |p| {
            match dir {
                Direction::In => p.links_in = p.links_in.saturating_sub(1),
                Direction::Out => p.links_out = p.links_out.saturating_sub(1),
            }
            p.last_error = Some(reason.to_string());
        });
    }

    /// A dial or handshake that never became a link.
    pub fn failure(&self, peer: &str, reason: &str) {
        self.with(peer, |p| p.last_error = Some(reason.to_string()));
    }

    /// An anti-entropy comparison with `peer` finished; `summary` counts the current pass.
    pub fn audited(&self, peer: &str, summary: &crate::sync::engine::AuditSummary) {
        self.with(peer, |p| p.anti_entropy = Some((now(), summary.clone())));
    }

    pub fn contact(&self, peer: &str) {
        self.with(peer, |p| p.last_contact = Some(now()));
    }

    /// Records a HELLO with another fingerprint; true when it is time to log it again.
    pub fn mismatch(&self, peer: &str, theirs: &[u8; 32]) -> bool {
        self.with(peer, |p| {
            p.config_match = Some(false);
            p.peer_fingerprint = Some(super::hex(theirs));
            p.last_error = Some("config mismatch".into());
            p.last_contact = Some(now());
            let due = p.mismatch_logged.is_none_or(|t| t.elapsed() >= MISMATCH_LOG_INTERVAL);
            if due {
                p.mismatch_logged = Some(Instant::now());
            }
            due
        })
        .unwrap_or(false)
    }

    /// Whether this node numbers messages for the cluster now: it is the first node of
    /// `[sync] order` that is itself or a peer with a live link (plan §2.4 rule 1). During a
    /// partition each side has its own allocator; the allocator after the heal renumbers what
    /// collided.
    pub fn is_allocator(&self) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for name in &self.order {
            if *name == self.node {
                return true;
            }
            let live = peers.get(name).is_some_and(|p| !matches!(p.state, PeerState::Down | PeerState::ConfigMismatch));
            if live {
                return false;
            }
        }
        true
    }

    pub fn view(&self) -> SyncView {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        SyncView {
            node: self.node.clone(),
            config_fingerprint: super::hex(&self.fingerprint),
            order: self.order.clone(),
            peers: peers
                .iter()
                .map(|(name, p)| PeerView {
                    peer: name.clone(),
                    state: p.state,
                    since: p.since,
                    config_match: p.config_match,
                    last_contact: p.last_contact,
                    connects: p.connects,
                    last_error: p.last_error.clone(),
                    peer_fingerprint: p.peer_fingerprint.clone(),
                    lag_changes: None,
                    lag_capped: false,
                    lag_seconds: None,
                    anti_entropy: p.anti_entropy.clone(),
                })
                .collect(),
            under_replicated: 0,
        }
    }

    /// Whether some peer can take this node's records now: the connection this node dialled
    /// (the one it pushes on, where acks come back) is up and the configs match.
    pub fn pushing(&self) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().any(|p| p.links_out > 0 && p.config_match != Some(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_links_and_mismatch() {
        let s = SyncStatus::new("a", [0; 32], vec!["a".into(), "b".into()], &["b".into()]);
        let state = || s.view().peers[0].state;
        assert_eq!(state(), PeerState::Down);
        s.link_up("b", Direction::Out, &[0; 32]);
        assert_eq!(state(), PeerState::OneWayOut);
        s.link_up("b", Direction::In, &[0; 32]);
        assert_eq!(state(), PeerState::Connected);
        // A second inbound link (a reconnect before the old one timed out) and its end.
        s.link_up("b", Direction::In, &[0; 32]);
        s.link_down("b", Direction::In, "closed");
        assert_eq!(state(), PeerState::Connected);
        s.link_down("b", Direction::In, "closed");
        s.link_down("b", Direction::Out, "closed");
        assert_eq!(state(), PeerState::Down);
        assert!(s.mismatch("b", &[1; 32]));
        assert!(!s.mismatch("b", &[1; 32]), "logged once per minute");
        assert_eq!(state(), PeerState::ConfigMismatch);
        assert_eq!(s.view().peers[0].config_match, Some(false));
        s.link_up("b", Direction::Out, &[0; 32]);
        s.link_up("b", Direction::In, &[0; 32]);
        assert_eq!(state(), PeerState::Connected);
        // Unknown peers are ignored.
        s.link_up("zz", Direction::In, &[0; 32]);
        assert_eq!(s.view().peers.len(), 1);
    }
}
