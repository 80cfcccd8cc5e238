//! Under-replicated markers (`W` keys): the messages a node answered (SMTP 250, APPEND OK)
//! without any peer's durable ack (issue 8: "otherwise it is marked under-replicated and pushed
//! first when a peer returns"). `sync::durable` writes them and removes them once a peer's
//! acknowledged vector covers them; being in the store, they outlive a restart, so the count in
//! `postern sync status` and the push order do not forget a delivery a crash or restart
//! interrupted. A marker is advisory: losing one (a crash within the second before sled's
//! periodic flush) loses no mail, the record still counts in the peer's lag.

use super::{keys, ChangeId, Result, Store, StoreError, VersionVector};

impl Store {
    /// Marks the messages `ids` of account `acct` as answered without a peer's ack.
    pub fn mark_under_replicated(&self, acct: u32, ids: &[ChangeId]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.insert(&keys::under_replicated(acct, id.hlc, id.node), &[]);
        }
        self.meta.apply_batch(batch)?;
        Ok(())
    }

    /// Removes the account's markers that `acked` (one peer's acknowledged vector) covers;
    /// returns how many are left for the account.
    pub fn clear_under_replicated(&self, acct: u32, acked: &VersionVector) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut left = 0;
        for key in self.meta.scan_prefix(keys::under_replicated_prefix(acct)).keys() {
            let key = key?;
            let (hlc, node) = keys::change_parts(&key);
            if acked.covers(ChangeId { hlc, node }) {
                batch.remove(key);
            } else {
                left += 1;
            }
        }
        self.meta.apply_batch(batch)?;
        Ok(left)
    }

    /// The account's markers, oldest first.
    pub fn under_replicated(&self, acct: u32) -> Result<Vec<ChangeId>> {
        self.meta
            .scan_prefix(keys::under_replicated_prefix(acct))
            .keys()
            .map(|k| {
                let (hlc, node) = keys::change_parts(&k?);
                Ok(ChangeId { hlc, node })
            })
            .collect()
    }

    /// Markers over every account.
    pub fn under_replicated_count(&self) -> Result<u64> {
        let mut n = 0;
        for key in self.meta.scan_prefix([keys::UNDER_REPLICATED]).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    /// The addresses of the accounts that have markers, one seek per account.
    pub fn under_replicated_addresses(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut from = vec![keys::UNDER_REPLICATED];
        while let Some(key) = self.meta.range(from..keys::prefix_end(&[keys::UNDER_REPLICATED])).keys().next() {
            let key = key?;
            let acct =
                u32::from_be_bytes(key.get(1..5).and_then(|b| b.try_into().ok()).ok_or(StoreError::Invalid("W key"))?);
            if let Some(account) = self.account(acct)? {
                out.push(account.address);
            }
            from = keys::prefix_end(&keys::under_replicated_prefix(acct));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_persist_and_clear_when_covered() {
        let dir = tempfile::tempdir().unwrap();
        let id = |hlc: u64, node: u32| ChangeId { hlc: hlc << 16, node };
        {
            let store = Store::open(dir.path(), "a", 8 << 20).unwrap();
            let x = store.ensure_account("x@e.test").unwrap();
            let y = store.ensure_account("y@e.test").unwrap();
            store.ensure_account("z@e.test").unwrap();
            store.mark_under_replicated(x, &[id(5, 1), id(7, 1)]).unwrap();
            store.mark_under_replicated(y, &[id(6, 1)]).unwrap();
            store.mark_under_replicated(y, &[id(6, 1)]).unwrap();
            assert_eq!(store.under_replicated_count().unwrap(), 3, "marking twice is one marker");
            let mut with = store.under_replicated_addresses().unwrap();
            with.sort();
            assert_eq!(with, ["x@e.test", "y@e.test"]);
            store.sync_blocking().unwrap();
        }
        // After a restart.
        let store = Store::open(dir.path(), "a", 8 << 20).unwrap();
        let x = store.account_id("x@e.test").unwrap().unwrap();
        let y = store.account_id("y@e.test").unwrap().unwrap();
        assert_eq!(store.under_replicated_count().unwrap(), 3);
        assert_eq!(store.under_replicated(x).unwrap(), [id(5, 1), id(7, 1)]);
        // A vector of another node, or one below the marker, covers nothing.
        let mut v = VersionVector::default();
        v.advance(id(9, 2));
        v.advance(id(6, 1));
        assert_eq!(store.clear_under_replicated(x, &v).unwrap(), 1);
        assert_eq!(store.under_replicated(x).unwrap(), [id(7, 1)]);
        assert_eq!(store.under_replicated(y).unwrap(), [id(6, 1)], "another account's markers stay");
        v.advance(id(7, 1));
        assert_eq!(store.clear_under_replicated(x, &v).unwrap(), 0);
        assert_eq!(store.under_replicated_addresses().unwrap(), ["y@e.test"]);
        assert_eq!(store.under_replicated_count().unwrap(), 1);
    }
}
