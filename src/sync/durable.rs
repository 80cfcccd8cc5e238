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
//! "Marked under-replicated": a message whose wait ended without an ack gets a marker in the
//! store (`W` keys, `store::underrepl`), removed once a peer's acknowledged vector covers it, so
//! the count survives a restart. "Pushed first when a peer returns": the pusher pages the accounts
//! with markers before the others (`StoreReplica::accounts`), and each account's records oldest
//! first from the peer's acknowledged vector, so the records that missed their ack (the oldest
//! ones the peer lacks) are the first of their account to go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::status::{SyncStatus, SyncView};
use crate::config::{Config, Node, Role};
use crate::store::{ChangeId, Store, VersionVector};

/// `lag_changes` counts at most this many records per peer: the status call stays cheap on a
/// node whose peer has been away for weeks.
pub const LAG_CAP: usize = 10_000;

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
    /// The addresses of the accounts with under-replicated markers in the store, so that an ack
    /// for any other account costs no store read. Held while markers are written or cleared, so
    /// the set and the store agree.
    marked: Mutex<BTreeSet<String>>,
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
        let marked = store.under_replicated_addresses().unwrap_or_else(|e| {
            tracing::warn!("sync durable ack: reading under-replicated markers failed error={e}");
            Vec::new()
        });
        Replication {
            status,
            store,
            ack_timeout,
            acked: Mutex::new(BTreeMap::new()),
            acks: watch::channel(0).0,
            kicks: watch::channel(0).0,
            marked: Mutex::new(marked.into_iter().collect()),
        }
    }

    pub fn status(&self) -> &Arc<SyncStatus> {
        &self.status
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Records what `peer` has durably acknowledged for `account`, wakes the waiters, and drops
    /// the account's under-replicated markers the vector covers.
    pub fn publish(&self, peer: &str, account: &str, vector: &VersionVector) {
        {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            acked.entry(peer.to_string()).or_default().insert(account.to_string(), vector.clone());
        }
        self.changed();
        self.clear_marks(account, std::slice::from_ref(vector));
    }

    /// Drops `address`'s markers that one of `vectors` covers. A no-op without markers.
    fn clear_marks(&self, address: &str, vectors: &[VersionVector]) {
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if !marked.contains(address) {
            return;
        }
        let acct = match self.store.account_id(address) {
            Ok(Some(acct)) => acct,
            Ok(None) => {
                marked.remove(address);
                return;
            }
            Err(e) => {
                tracing::warn!("sync durable ack: account={address} error={e}");
                return;
            }
        };
        for v in vectors {
            match self.store.clear_under_replicated(acct, v) {
                Ok(0) => {
                    marked.remove(address);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("sync durable ack: clearing markers account={address} error={e}");
                    return;
                }
            }
        }
    }

    /// Every peer's acknowledged vector for `address`.
    fn acked_vectors(&self, address: &str) -> Vec<VersionVector> {
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.values().filter_map(|accounts| accounts.get(address).cloned()).collect()
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
    /// them, already durable here. Records that missed their ack are marked under-replicated.
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
                self.mark(acct, &address, &ids);
            }
        }
        if outcome != Replicated::Yes {
            tracing::debug!("sync delivery under-replicated ({outcome:?})");
        }
        outcome
    }

    /// Persists markers for `ids`, then drops those an ack that arrived meanwhile covers: an ack
    /// published before the marker was written found nothing to clear.
    fn mark(&self, acct: u32, address: &str, ids: &[ChangeId]) {
        {
            let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.store.mark_under_replicated(acct, ids) {
                tracing::warn!("sync durable ack: marking under-replicated account={address} error={e}");
                return;
            }
            marked.insert(address.to_string());
        }
        self.clear_marks(address, &self.acked_vectors(address));
    }

    /// The peer table with the measured figures. Reads sled: a few keys per account, and for a
    /// peer that lags, at most [`LAG_CAP`] records.
    pub fn view(&self) -> SyncView {
        let mut view = self.status.view();
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        view.under_replicated = self.store.under_replicated_count().unwrap_or_else(|e| {
            tracing::warn!("sync status: counting under-replicated markers failed error={e}");
            0
        });
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
        on(store, timeout)
    }

    fn on(store: Arc<Store>, timeout: Duration) -> Arc<Replication> {
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

    /// A message placed in `address`'s INBOX: (account, mailbox, UID) as `wait_stored` takes them.
    fn append(store: &Store, address: &str) -> (u32, u32, u32) {
        let acct = store.ensure_account(address).unwrap();
        let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let meta = crate::store::MessageMeta {
            flags: crate::store::Flags(0),
            keywords: &[],
            internal_date: 0,
            tz_offset_minutes: 0,
        };
        let (_, uid) = store.append_message(acct, inbox, w.finish().unwrap(), &meta).unwrap();
        (acct, inbox, uid)
    }

    /// Deliveries answered without an ack are marked in the store: counted in the status after
    /// a restart, listed first by the replica, and cleared by the first ack that covers them,
    /// including one from before the restart's reconnection (a `Vectors` publication).
    #[tokio::test]
    async fn under_replicated_markers_survive_a_restart_until_acked() {
        use crate::sync::engine::Replica;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), "a", 8 << 20).unwrap());
        let r = on(store.clone(), Duration::from_millis(100));
        let early = append(&store, "early@e.test");
        let x1 = append(&store, "x@e.test");
        let x2 = append(&store, "x@e.test");
        let y = append(&store, "y@e.test");
        // No peer: at once, marked.
        assert_eq!(r.wait_stored(&[x1]).await, Replicated::NoPeer);
        // A live peer that does not answer: the timeout, marked; one delivery to two accounts.
        r.status().link_up("b", Direction::Out, &[0; 32]);
        assert_eq!(r.wait_stored(&[x2, y]).await, Replicated::TimedOut);
        assert_eq!(r.view().under_replicated, 3);
        let replica = super::super::replica::StoreReplica::new(store.clone());
        let order = replica.accounts();
        assert_eq!(order.last().map(String::as_str), Some("early@e.test"), "marked accounts first: {order:?}");
        let id = |m: (u32, u32, u32)| store.message_id(m.0, m.1, m.2).unwrap().unwrap();
        let x1_id = id(x1);
        drop((r, replica));

        // Restarted: the markers are still there; an ack for x1 only clears x1.
        let r = on(store.clone(), Duration::from_millis(100));
        assert_eq!(r.view().under_replicated, 3);
        let mut v = VersionVector::default();
        v.advance(x1_id);
        r.publish("b", "x@e.test", &v);
        assert_eq!(r.view().under_replicated, 2);
        v.advance(id(x2));
        r.publish("b", "x@e.test", &v);
        let mut vy = VersionVector::default();
        vy.advance(id(y));
        r.publish("b", "y@e.test", &vy);
        assert_eq!(r.view().under_replicated, 0);
        assert_eq!(store.under_replicated_count().unwrap(), 0);
        assert!(store.under_replicated(early.0).unwrap().is_empty());

        // An ack published between the end of a wait and its marker (it came just after the
        // timeout) found nothing to clear: the marker is dropped as it is written.
        let z = append(&store, "y@e.test");
        vy.advance(id(z));
        r.publish("b", "y@e.test", &vy);
        r.mark(z.0, "y@e.test", &[id(z)]);
        assert_eq!(r.view().under_replicated, 0);
    }
}
