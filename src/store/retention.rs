//! Retention of the replication log (issue 8; `docs/design/replication-plan.md` §3.5).
//!
//! `R` records older than `[sync] retention` are folded into the account's *base snapshot*
//! (`H` keys: their merged state and the vector of what it covers) and deleted. A peer whose
//! vector does not reach that vector can no longer be sent the pruned records; the engine sends
//! it the snapshot, which it joins into its own base (`install_snapshot`), and then the records
//! after it. The merged state is a join-semilattice (`merge::AccountState::join`), so a snapshot
//! joined into a node that holds some of the same records, or records the sender never saw (its
//! own unreplicated changes), gives the state of the union: nothing the receiver did is lost,
//! and an expunge (a tombstone in the snapshot) keeps a message it still had from coming back.
//!
//! Per origin, records are pruned in HLC order, so the base vector stays a prefix per origin
//! and `R` holds exactly the records the base does not cover.

use super::{decode, encode, keys, Result, Store, VersionVector};
use crate::sync::merge::{Record, Snapshot};

/// Records folded per call of `prune_replicated`, to bound the memory and the batch of one pass.
pub const PRUNE_AT_ONCE: usize = 20_000;

impl Store {
    /// The vector of the account's base snapshot: empty until retention pruned something.
    pub fn replication_horizon(&self, acct: u32) -> Result<VersionVector> {
        match self.meta.get(keys::base_vector(acct))? {
            Some(v) => decode(&v),
            None => Ok(VersionVector::default()),
        }
    }

    /// The account's base snapshot, as stored (postcard `merge::Snapshot`).
    pub fn replication_snapshot_bytes(&self, acct: u32) -> Result<Vec<u8>> {
        match self.meta.get(keys::base_snapshot(acct))? {
            Some(v) => Ok(v.to_vec()),
            None => Ok(encode(&Snapshot::default())),
        }
    }

    pub(super) fn replication_base(&self, acct: u32) -> Result<Snapshot> {
        match self.meta.get(keys::base_snapshot(acct))? {
            Some(v) => decode(&v),
            None => Ok(Snapshot::default()),
        }
    }

    fn put_base(&self, batch: &mut sled::Batch, acct: u32, base: &Snapshot) {
        batch.insert(&keys::base_vector(acct), encode(&base.vector));
        batch.insert(&keys::base_snapshot(acct), encode(base));
    }

    /// Folds the account's durable `R` records with an HLC below `before` into its base
    /// snapshot and deletes them, at most [`PRUNE_AT_ONCE`] per call (call again while it
    /// returns that many). Returns how many were pruned. What IMAP shows does not change: the
    /// merged state is the same, only where it is kept.
    pub fn prune_replicated(&self, acct: u32, before: u64) -> Result<usize> {
        let _guard = self.write.lock().expect("store lock");
        let limit = before.min(self.durable_hlc().saturating_add(1));
        let mut records: Vec<(sled::IVec, Record)> = Vec::new();
        for item in self.meta.scan_prefix(keys::replicated_prefix(acct)) {
            let (k, v) = item?;
            let (hlc, _) = keys::change_parts(&k);
            if hlc >= limit || records.len() >= PRUNE_AT_ONCE {
                break;
            }
            records.push((k, decode(&v)?));
        }
        if records.is_empty() {
            return Ok(0);
        }
        let mut base = self.replication_base(acct)?;
        let mut batch = sled::Batch::default();
        for (k, r) in &records {
            base.absorb(r);
            batch.remove(k);
        }
        base.state.compact();
        self.put_base(&mut batch, acct, &base);
        // The account's merged state may not have read the newest of these records yet (it
        // catches up from `R` lazily): it must before they leave `R`.
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        if cache.contains_key(&acct) {
            self.catch_up(&mut cache, acct)?;
        }
        self.apply(batch)?;
        Ok(records.len())
    }

    /// Joins a peer's base snapshot into this node's (creating the account when it is new),
    /// advances the vector to cover it, drops the `R` records it now covers, and brings the
    /// mailboxes in line with the merged state, in one batch.
    pub fn install_snapshot(&self, address: &str, snapshot: &Snapshot) -> Result<()> {
        let _guard = self.write.lock().expect("store lock");
        let acct = self.ensure_account_locked(address)?;
        if let Some(max) = snapshot.vector.iter().map(|(_, hlc)| hlc).max() {
            self.clock.observe(max);
        }
        let mut base = self.replication_base(acct)?;
        base.join(snapshot);
        base.state.compact();
        let mut vector = self.vector(acct)?;
        vector.join(&snapshot.vector);
        let mut batch = sled::Batch::default();
        self.put_base(&mut batch, acct, &base);
        for (node, hlc) in vector.iter() {
            batch.insert(&keys::vector(acct, node), &hlc.to_be_bytes());
        }
        // Every record the new base covers is in it (the sender held each origin's prefix).
        for item in self.meta.scan_prefix(keys::replicated_prefix(acct)).keys() {
            let k = item?;
            let (hlc, node) = keys::change_parts(&k);
            if hlc <= base.vector.get(node) {
                batch.remove(k);
            }
        }
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| {
            merged.join_snapshot(snapshot);
            self.reconcile_and_apply(batch, acct, merged)
        });
        self.finish(&mut cache, acct, outcome)
    }
}
