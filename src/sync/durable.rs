//! Durable delivery across nodes (issue 8, plan §4): a delivery is acknowledged once it is on
//! disk here and, when a peer is reachable, durably acknowledged by one peer within
//! `[sync] ack_timeout`. Otherwise it is counted under-replicated and still acknowledged: the
//! wait never loses mail and never delays an answer beyond the timeout.
//!
//! [`Replication`] is the handle the queue and IMAP share with the link tasks. The link that
//! pushes to a peer publishes the peer's acknowledged vectors here on every `Ack` (and the
//! `Vectors` a connection starts with); waiters wake on each publication. A waiter also kicks the
//! pushers, so its records leave at once rather than on the next 200 ms pump.
//!
//! "Pushed first when a peer returns": the pusher pages each account's records oldest first from
//! the peer's acknowledged vector, so records that missed their ack (the oldest ones the peer
//! lacks) are the first of their account to go when the link comes back. Accounts are not
//! reordered by urgency.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::status::{SyncStatus, SyncView};
use crate::config::{Config, Node, Role};
use crate::store::{ChangeId, Store, VersionVector};

/// `lag_changes` counts at most this many records per peer: the status call stays cheap on a
/// node whose peer has been away for weeks.
pub const LAG_CAP: usize = 10_000;

/// Timed-out deliveries remembered for the under-replicated count; beyond this the oldest are
/// forgotten (they still show in the lag).
const UNDER_MAX: usize = 100_000;

/// How a wait for a peer's durable ack ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// A peer holds every record on disk.
    Yes,
    /// A peer was live but did not acknowledge within the timeout.
    TimedOut,
    /// No peer was live: nothing to wait for.
    NoPeer,
}

/// One node's replication state shared by the links, the queue, IMAP and the status reader.
pub struct Replication {
    status: Arc<SyncStatus>,
    store: Arc<Store>,
    ack_timeout: Duration,
    /// Per peer, per account: what the peer has durably acknowledged. Outlives connections.
    acked: Mutex<BTreeMap<String, BTreeMap<String, VersionVector>>>,
    /// Bumped on every publication and link change: waiters re-check.
    acks: watch::Sender<u64>,
    /// Bumped when a waiter needs its records pushed now.
    kicks: watch::Sender<u64>,
    /// Deliveries answered without an ack, (account address, record ids), until a peer acks them.
    under: Mutex<VecDeque<(String, Vec<ChangeId>)>>,
}

impl Replication {
    /// `None` when replication is off on this node (no `[sync]`, or a backup).
    pub fn new(config: &Config, node: &Node, store: Arc<Store>) -> Option<Arc<Replication>> {
        let sync = config.sync.as_ref()?;
        if node.role != Role::Primary {
            return None;
        }
        let peers = config.sync_peers(&node.name);
        let status = Arc::new(SyncStatus::new(&node.name, super::fingerprint(config), config.sync_order(), &peers));
        Some(Arc::new(Replication::with_status(status, store, sync.ack_timeout)))
    }

    pub fn with_status(status: Arc<SyncStatus>, store: Arc<Store>, ack_timeout: Duration) -> Replication {
        Replication {
            status,
            store,
            ack_timeout,
            acked: Mutex::new(BTreeMap::new()),
            acks: watch::channel(0).0,
            kicks: watch::channel(0).0,
            under: Mutex::new(VecDeque::new()),
        }
    }

    pub fn status(&self) -> &Arc<SyncStatus> {
        &self.status
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Records what `peer` has durably acknowledged for `account` and wakes the waiters.
    pub fn publish(&self, peer: &str, account: &str, vector: &VersionVector) {
        {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            acked.entry(peer.to_string()).or_default().insert(account.to_string(), vector.clone());
        }
        self.changed();
    }

    /// The peer said what it holds (its `Vectors`, possibly for no account at all): from now on
    /// its lag is measured.
    pub fn known(&self, peer: &str) {
        let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.entry(peer.to_string()).or_default();
    }

    /// A link came up or went down: a waiter whose last peer left stops waiting.
    pub fn changed(&self) {
        self.acks.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes each time a waiter wants its records pushed without waiting for the pump.
    pub fn kicks(&self) -> watch::Receiver<u64> {
        self.kicks.subscribe()
    }

    fn covered(&self, address: &str, ids: &[ChangeId]) -> bool {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        covered_by_any(&acked, address, ids)
    }

    /// Waits until one peer has durably acknowledged every record in `ids` of `address`'s
    /// account, at most `timeout`; at once with `NoPeer` when no peer is live.
    pub async fn wait_replicated(&self, address: &str, ids: &[ChangeId], timeout: Duration) -> Replicated {
        let mut rx = self.acks.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        self.kicks.send_modify(|n| *n = n.wrapping_add(1));
        loop {
            rx.borrow_and_update();
            if ids.is_empty() || self.covered(address, ids) {
                return Replicated::Yes;
            }
            if !self.status.pushing() {
                return Replicated::NoPeer;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Replicated::TimedOut,
            }
        }
    }

    /// The wait for a local write: `messages` are (account, mailbox, UID) as the store placed
    /// them, already durable here. Records that missed their ack are counted under-replicated.
    /// Never fails: a store error is logged and the delivery is answered as before.
    pub async fn wait_stored(&self, messages: &[(u32, u32, u32)]) -> Replicated {
        let mut by_account: BTreeMap<u32, Vec<ChangeId>> = BTreeMap::new();
        for &(acct, mbox, uid) in messages {
            match self.store.message_id(acct, mbox, uid) {
                Ok(Some(id)) => by_account.entry(acct).or_default().push(id),
                Ok(None) => {}
                Err(e) => tracing::warn!("sync durable ack: message id account={acct} error={e}"),
            }
        }
        let mut outcome = Replicated::Yes;
        // The accounts of one delivery share the time budget: the answer waits at most once.
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        for (acct, ids) in by_account {
            let address = match self.store.account(acct) {
                Ok(Some(a)) => a.address,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("sync durable ack: account={acct} error={e}");
                    continue;
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let result = self.wait_replicated(&address, &ids, left).await;
            if result != Replicated::Yes {
                if outcome == Replicated::Yes {
                    outcome = result;
                }
                let mut under = self.under.lock().unwrap_or_else(|e| e.into_inner());
                if under.len() >= UNDER_MAX {
                    under.pop_front();
                }
                under.push_back((address, ids));
            }
        }
        if outcome != Replicated::Yes {
            tracing::debug!("sync delivery under-replicated ({outcome:?})");
        }
        outcome
    }

    /// The peer table with the measured figures. Reads sled: a few keys per account, and for a
    /// peer that lags, at most [`LAG_CAP`] records.
    pub fn view(&self) -> SyncView {
        let mut view = self.status.view();
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        {
            let mut under = self.under.lock().unwrap_or_else(|e| e.into_inner());
            under.retain(|(address, ids)| !covered_by_any(&acked, address, ids));
            view.under_replicated = under.len() as u64;
        }
        let accounts = match self.accounts() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("sync status: reading accounts failed error={e}");
                return view;
            }
        };
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for p in &mut view.peers {
            let Some(theirs) = acked.get(&p.peer) else { continue };
            let (count, capped, oldest) = self.lag(&accounts, theirs);
            p.lag_changes = Some(count);
            p.lag_capped = capped;
            p.lag_seconds = Some(oldest.map_or(0, |hlc| now_ms.saturating_sub(hlc >> 16) / 1000));
        }
        view
    }

    /// (address, id, vector) of every account.
    fn accounts(&self) -> crate::store::Result<Vec<(String, u32, VersionVector)>> {
        let mut out = Vec::new();
        for address in self.store.account_addresses()? {
            let Some(acct) = self.store.account_id(&address)? else { continue };
            let vector = self.store.vector(acct)?;
            out.push((address, acct, vector));
        }
        Ok(out)
    }

    /// Records held here and not acknowledged by a peer: (count up to the cap, capped, HLC of the
    /// oldest).
    fn lag(
        &self,
        accounts: &[(String, u32, VersionVector)],
        theirs: &BTreeMap<String, VersionVector>,
    ) -> (u64, bool, Option<u64>) {
        let empty = VersionVector::default();
        let (mut count, mut capped, mut oldest) = (0usize, false, None::<u64>);
        for (address, acct, held) in accounts {
            let acked = theirs.get(address).unwrap_or(&empty);
            if held.iter().all(|(node, hlc)| hlc <= acked.get(node)) {
                continue;
            }
            let limit = if capped { 1 } else { LAG_CAP + 1 - count };
            let page = match self.store.replicated_page(*acct, acked, limit) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("sync status: lag of account={address} error={e}");
                    continue;
                }
            };
            if let Some(first) = page.first() {
                oldest = Some(oldest.map_or(first.id.hlc, |o| o.min(first.id.hlc)));
            }
            if !capped {
                count += page.len();
                if count > LAG_CAP {
                    count = LAG_CAP;
                    capped = true;
                }
            }
        }
        (count as u64, capped, oldest)
    }
}

fn covered_by_any(acked: &BTreeMap<String, BTreeMap<String, VersionVector>>, address: &str, ids: &[ChangeId]) -> bool {
    acked.values().any(|accounts| accounts.get(address).is_some_and(|v| ids.iter().all(|id| v.covers(*id))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::status::Direction;

    fn replication(dir: &std::path::Path, timeout: Duration) -> Arc<Replication> {
        let store = Arc::new(Store::open(dir, "a", 8 << 20).unwrap());
        let status = Arc::new(SyncStatus::new("a", [0; 32], vec!["a".into(), "b".into()], &["b".into()]));
        Arc::new(Replication::with_status(status, store, timeout))
    }

    #[tokio::test]
    async fn waits_for_an_ack_times_out_or_sees_no_peer() {
        let dir = tempfile::tempdir().unwrap();
        let r = replication(dir.path(), Duration::from_millis(300));
        let id = ChangeId { hlc: 5 << 16, node: 1 };
        // No live peer: at once.
        let t = std::time::Instant::now();
        assert_eq!(r.wait_replicated("x@e.test", &[id], Duration::from_secs(5)).await, Replicated::NoPeer);
        assert!(t.elapsed() < Duration::from_millis(200));
        // A live peer that never acks: the timeout.
        r.status().link_up("b", Direction::Out, &[0; 32]);
        let t = std::time::Instant::now();
        assert_eq!(r.wait_replicated("x@e.test", &[id], Duration::from_millis(300)).await, Replicated::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(290));
        // An ack arriving during the wait ends it.
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait_replicated("x@e.test", &[id], Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut v = VersionVector::default();
        v.advance(ChangeId { hlc: 4 << 16, node: 1 });
        r.publish("b", "x@e.test", &v);
        v.advance(ChangeId { hlc: 6 << 16, node: 1 });
        r.publish("b", "x@e.test", &v);
        let t = std::time::Instant::now();
        assert_eq!(waiter.await.unwrap(), Replicated::Yes);
        assert!(t.elapsed() < Duration::from_secs(1));
        // Another account's vector does not count.
        assert_eq!(r.wait_replicated("y@e.test", &[id], Duration::from_millis(50)).await, Replicated::TimedOut);
        // The peer leaves mid-wait: the waiter stops at the link change.
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait_replicated("y@e.test", &[id], Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.status().link_down("b", Direction::Out, "closed");
        r.changed();
        assert_eq!(waiter.await.unwrap(), Replicated::NoPeer);
    }
}
