//! The engine's [`Replica`] over the sled store: records, bodies and reports come from
//! `store::replicate`. Every call blocks on sled; the network layer runs them off the async
//! threads. Store errors cannot travel through the trait: they are logged, and the engine sees
//! nothing new (no records, an unchanged vector), so it retries on its next pump or batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::engine::{Hash, Replica};
use super::merge::{Guid, Record, Snapshot};
use super::projection::Report;
use crate::store::{Store, VersionVector};

pub struct StoreReplica {
    store: Arc<Store>,
}

impl StoreReplica {
    pub fn new(store: Arc<Store>) -> Self {
        StoreReplica { store }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn account(&self, address: &str) -> Option<u32> {
        self.store.account_id(address).unwrap_or_else(|e| {
            tracing::warn!("replica account={address} error={e}");
            None
        })
    }
}

fn logged<T: Default>(what: &str, result: crate::store::Result<T>) -> T {
    result.unwrap_or_else(|e| {
        tracing::warn!("replica {what} error={e}");
        T::default()
    })
}

impl Replica for StoreReplica {
    fn accounts(&self) -> Vec<String> {
        // Accounts with under-replicated deliveries first (issue 8: "pushed first when a peer
        // returns"): the engine pumps accounts in this order. One seek per marked account.
        let mut all = logged("accounts", self.store.account_addresses());
        let first: std::collections::BTreeSet<String> =
            logged("under-replicated", self.store.under_replicated_addresses()).into_iter().collect();
        if !first.is_empty() {
            all.sort_by_key(|a| !first.contains(a));
        }
        all
    }

    fn vector(&self, account: &str) -> VersionVector {
        match self.account(account) {
            Some(acct) => logged("vector", self.store.vector(acct)),
            None => VersionVector::default(),
        }
    }

    fn page(&self, account: &str, after: &VersionVector, limit: usize) -> Vec<Record> {
        match self.account(account) {
            Some(acct) => logged("page", self.store.replicated_page(acct, after, limit)),
            None => Vec::new(),
        }
    }

    fn missing_blobs(&self, hashes: &[Hash]) -> Vec<Hash> {
        logged("missing-blobs", self.store.missing_blobs(hashes))
    }

    fn read_blob(&self, hash: &Hash) -> Option<Vec<u8>> {
        logged("read-blob", self.store.read_blob_bytes(hash))
    }

    fn write_blob(&mut self, hash: &Hash, bytes: &[u8]) -> bool {
        match self.store.write_blob(hash, bytes) {
            Ok(ok) => ok,
            Err(e) => {
                // A local failure (disk full): refusing the body closes the connection, and the
                // batch and its bodies come again on the next one, rather than leaving the
                // message held for good with its body never fetched again.
                tracing::warn!("replica write-blob error={e}");
                false
            }
        }
    }

    fn apply(&mut self, account: &str, records: &[Record]) {
        logged("apply", self.store.apply_replicated(account, records));
    }

    fn sync(&mut self) {
        logged("sync", self.store.sync_blocking());
    }

    fn reports(&self, account: &str) -> BTreeMap<Guid, Report> {
        match self.account(account) {
            Some(acct) => logged("reports", self.store.replication_reports(acct)),
            None => BTreeMap::new(),
        }
    }

    fn allocate(&mut self, account: &str, peer_reports: &[&BTreeMap<Guid, Report>]) -> bool {
        match self.account(account) {
            Some(acct) => logged("allocate", self.store.allocate_uids(acct, peer_reports)),
            None => false,
        }
    }

    fn digest(&self, account: &str) -> [u8; 32] {
        match self.account(account) {
            Some(acct) => logged("digest", self.store.shown_digest(acct)),
            None => [0; 32],
        }
    }

    fn repair(&mut self, account: &str) -> bool {
        match self.account(account) {
            Some(acct) => logged("repair", self.store.repair_replicated(acct)),
            None => false,
        }
    }

    fn horizon(&self, account: &str) -> VersionVector {
        match self.account(account) {
            Some(acct) => logged("horizon", self.store.replication_horizon(acct)),
            None => VersionVector::default(),
        }
    }

    fn snapshot(&self, account: &str) -> Vec<u8> {
        match self.account(account) {
            Some(acct) => logged("snapshot", self.store.replication_snapshot_bytes(acct)),
            None => Vec::new(),
        }
    }

    fn install(&mut self, account: &str, snapshot: &Snapshot) {
        // Rare (a peer was away longer than retention) and worth seeing in the log.
        let origins = snapshot.vector.iter().count();
        match self.store.install_snapshot(account, snapshot) {
            Ok(()) => tracing::info!("sync snapshot installed account={account} origins={origins}"),
            Err(e) => tracing::warn!("replica install-snapshot account={account} error={e}"),
        }
    }
}
