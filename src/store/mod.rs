//! The mailbox store: the only code that touches sled. Delivery, IMAP and (later) replication
//! all go through this API. Key layout, change log and invariants: `docs/store.md`.
//!
//! Writes that change metadata take one process-wide lock, read what they must, and apply one
//! atomic sled batch; durability comes from `sync()`, called *outside* the lock so that
//! concurrent deliveries share one fsync (group commit).

mod blob;
mod clock;
mod copy;
mod durable;
mod index;
pub mod keys;
mod mailbox;
mod message;
mod model;
pub mod queue;
mod replicate;
mod replog;
mod retention;
mod underrepl;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Mutex;

pub use blob::{BlobReader, BlobWriter, PendingBlob, CHUNK_SIZE};
pub use index::{MailboxView, Summary};
pub use mailbox::MailboxInfo;
pub use message::{DeliveryTarget, FlagOp, MessageMeta, Stored};
pub use model::*;
pub use queue::{NewQueued, QueueEntry, QueueRecipient};
pub use retention::PRUNE_AT_ONCE;

use clock::Hlc;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Codec(#[from] postcard::Error),
    #[error("no such mailbox")]
    NoSuchMailbox,
    #[error("mailbox already exists")]
    MailboxExists,
    #[error("{0}")]
    Invalid(&'static str),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Something changed in a mailbox: IMAP sessions on it refresh their view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxEvent {
    pub account: u32,
    pub mailbox: u32,
}

pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    chunks: sled::Tree,
    write: Mutex<()>,
    clock: Hlc,
    node: u32,
    events: tokio::sync::broadcast::Sender<MailboxEvent>,
    commit: durable::GroupCommit,
    /// Per-mailbox summaries for SELECT and cheap FETCHes (`index.rs`).
    index: index::Indexes,
    /// Merged replication state per account, for applying peers' records (`replicate.rs`).
    replication: replicate::Cache,
    /// The low 4 bits of the modseqs IMAP shows on a replicating node, 0 on a single node
    /// (`set_modseq_tag`).
    modseq_tag: std::sync::atomic::AtomicU8,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("serializing to a Vec cannot fail")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(postcard::from_bytes(bytes)?)
}

/// A stable 32-bit id for a node name, used in change ids (FNV-1a: tiny and stable forever).
pub fn node_id(name: &str) -> u32 {
    name.bytes().fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x01000193))
}

impl Store {
    /// Modseqs are per node counters (docs/design/replication-plan.md §2.5), so a client that
    /// fails over must be able to tell which node's counter a value came from: IMAP shows a
    /// replicating node's values as `counter << 4 | tag` (`imap::condstore`). `tag` is 1..=15,
    /// distinct per primary; 0 (the default) keeps the counter as it is, for a single node.
    pub fn set_modseq_tag(&self, tag: u8) {
        self.modseq_tag.store(tag & 15, std::sync::atomic::Ordering::Relaxed);
    }

    /// This node's modseq tag, `None` on a node that does not replicate.
    pub fn modseq_tag(&self) -> Option<u8> {
        Some(self.modseq_tag.load(std::sync::atomic::Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Sets this run's modseq tag from `configured` (the node's place in `[sync] order`, 0
    /// without `[sync]`) and the one this store last used (`Gmodseqtag`), and returns it. Once a
    /// store showed tagged values it keeps tagging them, with its last tag, even after `[sync]`
    /// is removed: untagged values would be 16 times smaller, and a client holding a larger one
    /// would be told of nothing newer (RFC 7162 §3.1.2.1: HIGHESTMODSEQ must not go down). A new
    /// configured tag replaces the saved one: values with the old tag then count as foreign, so
    /// clients resync once rather than miss a change. Saved and flushed before IMAP shows any.
    pub fn adopt_modseq_tag(&self, configured: u8) -> Result<u8> {
        let configured = configured & 15;
        let saved = self.meta.get(keys::GLOBAL_MODSEQ_TAG)?.and_then(|v| v.first().copied()).unwrap_or(0) & 15;
        let tag = if configured != 0 { configured } else { saved };
        if tag != saved {
            self.meta.insert(keys::GLOBAL_MODSEQ_TAG, &[tag])?;
            self.sync_blocking()?;
        }
        self.set_modseq_tag(tag);
        Ok(tag)
    }

    /// Opens (or creates) the store under `dir` and removes what an interrupted write left.
    pub fn open(dir: &Path, node_name: &str, cache_size: u64) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_size)
            // Nodes up to a quarter segment stay in the log file; 8 MiB segments keep a full leaf
            // of 64 KiB chunks (16 before a split) there, so `durable::barrier` can fdatasync
            // one file instead of syncing the whole filesystem.
            .segment_size(8 << 20)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from explicit flushes at acknowledgement points, not a timer.
            .flush_every_ms(Some(1000))
            .open()?;
        let meta = db.open_tree("meta")?;
        let chunks = db.open_tree("chunks")?;
        let floor = match meta.get(keys::GLOBAL_CLOCK)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Invalid("clock"))?),
            None => 0,
        };
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let store = Store {
            db,
            meta,
            chunks,
            write: Mutex::new(()),
            clock: Hlc::new(floor),
            node: node_id(node_name),
            events,
            commit: durable::GroupCommit::new(dir),
            index: index::Indexes::default(),
            replication: replicate::Cache::default(),
            modseq_tag: std::sync::atomic::AtomicU8::new(0),
        };
        store.recover()?;
        store.migrate_mailbox_guids()?;
        store.migrate_vectors()?;
        store.migrate_replication_log()?;
        Ok(store)
    }

    /// Drops chunks of bodies that were being written (or deleted) when the process stopped.
    fn recover(&self) -> Result<()> {
        let pending: Vec<_> = self.meta.scan_prefix([keys::PENDING_BLOB]).collect::<sled::Result<_>>()?;
        for (key, value) in pending {
            let id = u64::from_be_bytes(key[1..9].try_into().map_err(|_| StoreError::Invalid("pending key"))?);
            if !value.is_empty() {
                self.recover_fetched_blob(id, &value)?;
                continue;
            }
            self.remove_chunks(id)?;
            self.meta.remove(key)?;
        }
        Ok(())
    }

    fn remove_chunks(&self, id: u64) -> Result<()> {
        blob::remove_chunks(&self.chunks, id)
    }

    /// Makes every write so far durable (fsync). Concurrent callers share the disk flush.
    pub async fn sync(&self) -> Result<()> {
        self.commit.sync(&self.db, || self.watermark()).await?;
        Ok(())
    }

    /// Synchronous variant for tests and shutdown.
    pub fn sync_blocking(&self) -> Result<()> {
        let mark = self.watermark();
        self.db.flush()?;
        durable::barrier(self.commit.dir()).map_err(sled::Error::Io)?;
        self.commit.flushed(mark);
        Ok(())
    }

    /// The clock as of now, read under the write lock: records are stamped (`log_change`) and
    /// applied within one hold of that lock, so every record at or below this value is already
    /// in sled, and every record stamped later is above it.
    fn watermark(&self) -> u64 {
        let _guard = self.write.lock().expect("store lock");
        self.clock.current()
    }

    /// Every change record with an HLC at or below this is on disk: a flush that started after
    /// they were applied has completed. Replication ships this node's own records only up to
    /// here, so a crash can never take back a record a peer has seen (and then reuse its id).
    /// 0 after a start until the first `sync`.
    pub fn durable_hlc(&self) -> u64 {
        self.commit.durable_hlc()
    }

    /// Flushes when some record is not yet durable (a flag change does not wait for the disk,
    /// a restart starts with nothing durable), so replication can ship it. Cheap when nothing
    /// is waiting.
    pub fn make_durable(&self) -> Result<()> {
        if self.clock.current() > self.durable_hlc() {
            self.sync_blocking()?;
        }
        Ok(())
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<MailboxEvent> {
        self.events.subscribe()
    }

    fn notify(&self, account: u32, mailbox: u32) {
        let _ = self.events.send(MailboxEvent { account, mailbox });
    }

    pub fn blob_writer(&self) -> Result<BlobWriter> {
        BlobWriter::new(self)
    }

    /// The body with this hash, chunk by chunk; `None` when no entry references it.
    pub fn read_blob(&self, hash: &[u8; 32]) -> Result<Option<BlobReader>> {
        match self.meta.get(keys::blob(hash))? {
            Some(v) => {
                let meta: BlobMeta = decode(&v)?;
                Ok(Some(BlobReader::new(self, meta.id)))
            }
            None => Ok(None),
        }
    }

    /// The whole body in memory, for parsers that need it (bounded by the message size limit).
    pub fn read_blob_bytes(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let Some(reader) = self.read_blob(hash)? else { return Ok(None) };
        let mut out = Vec::new();
        for chunk in reader {
            out.extend_from_slice(&chunk?);
        }
        Ok(Some(out))
    }

    pub fn blob_meta(&self, hash: &[u8; 32]) -> Result<Option<BlobMeta>> {
        self.meta.get(keys::blob(hash))?.map(|v| decode(&v)).transpose()
    }

    /// Number of distinct bodies and of chunks stored (for tests and `docs/store.md` checks).
    pub fn blob_counts(&self) -> Result<(usize, usize)> {
        Ok((self.meta.scan_prefix([keys::BLOB]).count(), self.chunks.len()))
    }

    /// The account id for an address, if the account exists.
    pub fn account_id(&self, address: &str) -> Result<Option<u32>> {
        match self.meta.get(keys::account_by_name(address))? {
            Some(v) => {
                Ok(Some(u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Invalid("account id"))?)))
            }
            None => Ok(None),
        }
    }

    pub fn account(&self, acct: u32) -> Result<Option<Account>> {
        self.meta.get(keys::account(acct))?.map(|v| decode(&v)).transpose()
    }

    /// The account for an address, created with its default mailboxes on first use.
    pub fn ensure_account(&self, address: &str) -> Result<u32> {
        if let Some(id) = self.account_id(address)? {
            return Ok(id);
        }
        let _guard = self.write.lock().expect("store lock");
        self.ensure_account_locked(address)
    }

    fn ensure_account_locked(&self, address: &str) -> Result<u32> {
        if let Some(id) = self.account_id(address)? {
            return Ok(id);
        }
        let id = u32::try_from(self.db.generate_id()? % u64::from(u32::MAX)).expect("modulo fits");
        let mut account = Account { address: address.to_string(), next_mailbox_id: 1, modseq: 0, last_uidvalidity: 0 };
        let mut batch = sled::Batch::default();
        batch.insert(keys::account_by_name(address), &id.to_be_bytes());
        for (name, special) in DEFAULT_MAILBOXES {
            let guid = mailbox::default_mailbox_guid(address, name);
            self.create_mailbox_in(&mut batch, id, &mut account, name, special, guid)?;
        }
        batch.insert(&keys::account(id), encode(&account));
        // Born with a complete `R` log: nothing for the migration at open to add.
        batch.insert(replog::migrated_marker(id), &[]);
        self.apply(batch)?;
        Ok(id)
    }

    /// Applies a batch and persists the clock floor with it.
    fn apply(&self, mut batch: sled::Batch) -> Result<()> {
        batch.insert(keys::GLOBAL_CLOCK, &self.clock.current().to_be_bytes());
        self.meta.apply_batch(batch)?;
        Ok(())
    }

    /// Appends a change-log record to `batch`, its replication record (`R`, same id; `None` only
    /// when the change cannot be named in cluster terms, already logged by the caller), and the
    /// version vector's entry for them. Every local `C` and `R` key is written here, under the
    /// write lock, so this node's records reach sled in HLC order and the latest tick is the
    /// vector's maximum for this node. Returns the id (a new message's id, for `J`/`L`).
    fn log_change(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        modseq: u64,
        change: Change,
        op: Option<crate::sync::merge::Op>,
    ) -> ChangeId {
        let id = ChangeId { hlc: self.clock.tick(), node: self.node };
        let key = keys::change(acct, id.hlc, id.node);
        batch.insert(&key, encode(&ChangeRecord { id, modseq, change }));
        if let Some(op) = op {
            self.log_replicated(batch, acct, id, op);
        }
        batch.insert(&keys::vector(acct, id.node), &id.hlc.to_be_bytes());
        id
    }

    /// The account's version vector: per origin node, the highest HLC of its records held here.
    pub fn vector(&self, acct: u32) -> Result<VersionVector> {
        let mut vv = VersionVector::default();
        for item in self.meta.scan_prefix(keys::vector_prefix(acct)) {
            let (k, v) = item?;
            let node = u32::from_be_bytes(k[5..9].try_into().map_err(|_| StoreError::Invalid("vector key"))?);
            let hlc = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Invalid("vector value"))?);
            vv.0.insert(node, hlc);
        }
        Ok(vv)
    }

    /// Derives the `V` keys from the change log of every account whose vector is missing (a store
    /// written before vectors) or does not cover its newest record (a store last written by an
    /// older version). The whole log is read only then; otherwise one seek per account.
    fn migrate_vectors(&self) -> Result<()> {
        let accounts: Vec<_> = self.meta.scan_prefix([keys::ACCOUNT]).keys().collect::<sled::Result<_>>()?;
        for k in accounts {
            let acct = u32::from_be_bytes(k[1..5].try_into().map_err(|_| StoreError::Invalid("account key"))?);
            // `R` keys count too: the replication migration's records have no `C` twin.
            let prefixes = [keys::change_prefix(acct), keys::replicated_prefix(acct)];
            let mut vv = self.vector(acct)?;
            let mut covered = true;
            for prefix in prefixes {
                if let Some(last) = self.meta.scan_prefix(prefix).keys().next_back().transpose()? {
                    let (hlc, node) = keys::change_parts(&last);
                    covered &= vv.covers(ChangeId { hlc, node });
                }
            }
            if covered {
                continue;
            }
            for key in prefixes.iter().flat_map(|p| self.meta.scan_prefix(p).keys()) {
                let (hlc, node) = keys::change_parts(&key?);
                vv.advance(ChangeId { hlc, node });
            }
            let mut batch = sled::Batch::default();
            for (node, hlc) in vv.iter() {
                batch.insert(&keys::vector(acct, node), &hlc.to_be_bytes());
            }
            self.meta.apply_batch(batch)?;
        }
        Ok(())
    }

    /// The account's records that `after` does not cover, in (hlc, node) order: what a peer with
    /// that vector lacks. At most `limit_records` records and `limit_bytes` of encoded records,
    /// but at least one record when any is missing. The log is read lazily from the smallest HLC
    /// that `after` holds for a node present here (0 for one it lacks): every record below that is
    /// covered. Paging by advancing `after` with each page's ids visits each record once.
    pub fn changes_page(
        &self,
        acct: u32,
        after: &VersionVector,
        limit_records: usize,
        limit_bytes: usize,
    ) -> Result<Vec<ChangeRecord>> {
        let held = self.vector(acct)?;
        if held.iter().all(|(node, hlc)| hlc <= after.get(node)) {
            return Ok(Vec::new());
        }
        let floor = held.iter().map(|(node, _)| after.get(node)).min().unwrap_or(0);
        let prefix = keys::change_prefix(acct);
        let start = keys::change(acct, floor.saturating_add(1), 0).to_vec();
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in self.meta.range(start..keys::prefix_end(&prefix)) {
            let (k, v) = item?;
            let (hlc, node) = keys::change_parts(&k);
            if hlc <= after.get(node) {
                continue;
            }
            if !out.is_empty() && (out.len() >= limit_records || bytes + v.len() > limit_bytes) {
                break;
            }
            bytes += v.len();
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// The account's change log, oldest first, starting after `after` (for replication and tests).
    pub fn changes(&self, acct: u32, after: Option<ChangeId>) -> Result<Vec<ChangeRecord>> {
        let prefix = keys::change_prefix(acct);
        let start = match after {
            Some(id) => {
                let mut k = keys::change(acct, id.hlc, id.node).to_vec();
                k.push(0);
                k
            }
            None => prefix.to_vec(),
        };
        self.meta
            .range(start..keys::prefix_end(&prefix))
            .values()
            .map(|v| v.map_err(StoreError::from).and_then(|v| decode(&v)))
            .collect()
    }
}
