//! A shared in-memory index per mailbox: UID, flags, keywords, size, internal date and modseq of
//! every message, so SELECT, `[UNSEEN n]` and FETCH of those items on a big mailbox do not walk
//! (and decode) every `E` record in sled. sled stays the only source of truth; the index is a
//! cache that can always be rebuilt from it.
//!
//! Why it cannot diverge: it does not follow the write paths, it follows the records they leave.
//! Every batch that changes a mailbox's entries raises the mailbox's `highest_modseq` in the same
//! atomic batch and leaves an `S|modseq|uid` key for each entry it wrote and an `X|modseq|uid`
//! key for each it removed (`docs/store.md`). An index remembers the `highest_modseq` it is
//! consistent with; before every use it reads the mailbox record, and when that moved on it
//! replays only the `S` and `X` keys above its own modseq (re-reading those entries). A write path
//! added later (replication, `UNCHANGEDSINCE`) is covered as long as it keeps those invariants,
//! which CONDSTORE and QRESYNC need anyway. sled applies a batch atomically with respect to
//! point reads and iterator steps, so a mailbox record read first means every batch up to its
//! modseq is visible to the scans that follow; a batch that lands during the scans may be seen in
//! part, and is replayed in full at the next use (replaying is idempotent: UIDs are never reused).
//!
//! Restarts: an index of 1,000 messages or more is saved in sled (`I|acct|mbox`) after it is
//! built from scratch and again after every few thousand replayed changes. The first use after a
//! start loads that snapshot and replays what came after its modseq, the same way as above,
//! instead of decoding every entry (a 100,000-message INBOX: one value of about 3 MB instead of
//! 100,000). The snapshot is only a cache: it is written without fsync, and one that does not
//! match the mailbox (other UIDVALIDITY, modseq ahead of the mailbox, undecodable) is ignored.
//! Replaying from it relies on the `X` log keeping every expunge, as it does today; a future
//! pruning of that log must drop snapshots older than what it keeps.
//!
//! Memory: about 40 bytes per message (4 MB for 100,000), plus one copy of each distinct keyword
//! set. At most `MAX_ROWS` messages in `MAX_MAILBOXES` mailboxes are kept; the least recently
//! used are dropped beyond that and rebuilt on their next use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::{decode, encode, keys, Entry, Flags, Mailbox, Result, Store};

/// Messages kept over all cached mailboxes (~80 MB at 40 bytes each).
const MAX_ROWS: usize = 2_000_000;
/// Mailboxes kept, however small.
const MAX_MAILBOXES: usize = 512;
/// Smaller mailboxes are rebuilt from their entries faster than a snapshot is worth writing.
const SNAPSHOT_MIN_ROWS: usize = if cfg!(test) { 1 } else { 1_000 };
/// Replayed changes after which the snapshot is written again (at least; or an eighth of the rows).
const SNAPSHOT_AFTER_CHANGES: usize = if cfg!(test) { 2 } else { 5_000 };

/// One message as the index holds it (keywords by the number of their set in `keyword_sets`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Row {
    uid: u32,
    keywords: u32,
    flags: Flags,
    tz_offset_minutes: i16,
    size: u64,
    internal_date: i64,
    modseq: u64,
}

/// What FETCH of the cheap items needs about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary<'a> {
    pub uid: u32,
    pub flags: Flags,
    pub keywords: &'a [String],
    pub size: u64,
    pub internal_date: i64,
    pub tz_offset_minutes: i16,
    pub modseq: u64,
}

#[derive(Default)]
struct MboxIndex {
    loaded: bool,
    uidvalidity: u32,
    /// Every change up to this modseq is reflected (possibly some later ones too).
    modseq: u64,
    /// In UID order.
    rows: Vec<Row>,
    /// Distinct keyword sets; 0 is the empty set.
    keyword_sets: Vec<Vec<String>>,
    keyword_ids: HashMap<Vec<String>, u32>,
    /// Changes replayed since the snapshot in sled was written.
    replayed: usize,
}

/// An index as saved in sled: every change up to `modseq` is in it.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    uidvalidity: u32,
    modseq: u64,
    rows: Vec<Row>,
    keyword_sets: Vec<Vec<String>>,
}

/// A consistent read-only view of one mailbox, valid while the closure given to
/// `Store::with_view` runs.
pub struct MailboxView<'a> {
    idx: &'a MboxIndex,
}

impl MailboxView<'_> {
    pub fn len(&self) -> usize {
        self.idx.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idx.rows.is_empty()
    }

    fn summary(&self, r: &Row) -> Summary<'_> {
        Summary {
            uid: r.uid,
            flags: r.flags,
            keywords: &self.idx.keyword_sets[r.keywords as usize],
            size: r.size,
            internal_date: r.internal_date,
            tz_offset_minutes: r.tz_offset_minutes,
            modseq: r.modseq,
        }
    }

    /// The message with this UID, if it exists.
    pub fn get(&self, uid: u32) -> Option<Summary<'_>> {
        let pos = self.idx.rows.binary_search_by_key(&uid, |r| r.uid).ok()?;
        Some(self.summary(&self.idx.rows[pos]))
    }

    /// Every message in UID order.
    pub fn iter(&self) -> impl Iterator<Item = Summary<'_>> + '_ {
        self.idx.rows.iter().map(|r| self.summary(r))
    }

    pub fn uids(&self) -> Vec<u32> {
        self.idx.rows.iter().map(|r| r.uid).collect()
    }
}

impl MboxIndex {
    fn intern(&mut self, keywords: &[String]) -> u32 {
        if keywords.is_empty() {
            return 0;
        }
        if let Some(&id) = self.keyword_ids.get(keywords) {
            return id;
        }
        let id = self.keyword_sets.len() as u32;
        self.keyword_sets.push(keywords.to_vec());
        self.keyword_ids.insert(keywords.to_vec(), id);
        id
    }

    fn row(&mut self, uid: u32, e: &Entry) -> Row {
        Row {
            uid,
            keywords: self.intern(&e.keywords),
            flags: e.flags,
            tz_offset_minutes: e.tz_offset_minutes,
            size: e.size,
            internal_date: e.internal_date,
            modseq: e.modseq,
        }
    }

    fn clear(&mut self) {
        self.rows = Vec::new();
        self.keyword_sets = vec![Vec::new()];
        self.keyword_ids = HashMap::new();
    }

    fn upsert(&mut self, uid: u32, e: &Entry) {
        let row = self.row(uid, e);
        match self.rows.binary_search_by_key(&uid, |r| r.uid) {
            Ok(pos) => self.rows[pos] = row,
            Err(pos) => self.rows.insert(pos, row),
        }
    }

    fn remove(&mut self, uid: u32) {
        if let Ok(pos) = self.rows.binary_search_by_key(&uid, |r| r.uid) {
            self.rows.remove(pos);
        }
    }

    /// Keyword sets no longer used pile up as flags change; rebuild the table when it outgrows
    /// the mailbox.
    fn compact_keywords(&mut self) {
        if self.keyword_sets.len() <= 64 || self.keyword_sets.len() <= self.rows.len() / 4 {
            return;
        }
        let old = std::mem::replace(&mut self.keyword_sets, vec![Vec::new()]);
        self.keyword_ids.clear();
        let mut rows = std::mem::take(&mut self.rows);
        for r in &mut rows {
            r.keywords = self.intern(&old[r.keywords as usize]);
        }
        self.rows = rows;
    }
}

struct Slot {
    idx: RwLock<MboxIndex>,
    last_used: AtomicU64,
    rows: AtomicUsize,
}

/// The cached indexes of one store.
#[derive(Default)]
pub(super) struct Indexes {
    slots: Mutex<HashMap<(u32, u32), Arc<Slot>>>,
    tick: AtomicU64,
}

impl Indexes {
    fn slot(&self, acct: u32, mbox: u32) -> Arc<Slot> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().expect("index map");
        let slot = slots
            .entry((acct, mbox))
            .or_insert_with(|| {
                Arc::new(Slot { idx: RwLock::new(MboxIndex::default()), last_used: AtomicU64::new(0), rows: 0.into() })
            })
            .clone();
        slot.last_used.store(now, Ordering::Relaxed);
        slot
    }

    fn forget(&self, acct: u32, mbox: u32) {
        self.slots.lock().expect("index map").remove(&(acct, mbox));
    }

    /// Drops the least recently used indexes (never `keep`) while over the limits. A session
    /// still holding a dropped slot finishes with it; the next use rebuilds from sled.
    fn evict(&self, keep: (u32, u32)) {
        let mut slots = self.slots.lock().expect("index map");
        loop {
            let total: usize = slots.values().map(|s| s.rows.load(Ordering::Relaxed)).sum();
            if total <= MAX_ROWS && slots.len() <= MAX_MAILBOXES {
                return;
            }
            let oldest = slots
                .iter()
                .filter(|(k, _)| **k != keep)
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    slots.remove(&k);
                }
                None => return,
            }
        }
    }

    #[cfg(test)]
    pub(super) fn cached(&self) -> usize {
        self.slots.lock().expect("index map").len()
    }
}

impl Store {
    /// Runs `f` on an up-to-date view of the mailbox; `None` when the mailbox does not exist.
    /// `f` runs under the index's read lock (or its write lock just after a refresh): keep it
    /// short and synchronous.
    pub fn with_view<R>(&self, acct: u32, mbox: u32, f: impl FnOnce(&MailboxView<'_>) -> R) -> Result<Option<R>> {
        let Some(mailbox) = self.mailbox(acct, mbox)? else {
            self.index.forget(acct, mbox);
            return Ok(None);
        };
        let slot = self.index.slot(acct, mbox);
        {
            let idx = slot.idx.read().expect("index lock");
            if is_current(&idx, &mailbox) {
                return Ok(Some(f(&MailboxView { idx: &idx })));
            }
        }
        let mut idx = slot.idx.write().expect("index lock");
        // The mailbox record again: another session may have refreshed the index meanwhile, and
        // ours may be older than what it replayed.
        let Some(mailbox) = self.mailbox(acct, mbox)? else {
            drop(idx);
            self.index.forget(acct, mbox);
            return Ok(None);
        };
        let grew = !idx.loaded;
        if !is_current(&idx, &mailbox) {
            if let Err(e) = self.refresh_index(&mut idx, acct, mbox, &mailbox) {
                // Half replayed: start again from scratch next time.
                idx.loaded = false;
                idx.clear();
                return Err(e);
            }
        }
        slot.rows.store(idx.rows.len(), Ordering::Relaxed);
        let out = f(&MailboxView { idx: &idx });
        drop(idx);
        if grew {
            self.index.evict((acct, mbox));
        }
        Ok(Some(out))
    }

    /// Takes the saved index when it belongs to this incarnation of the mailbox and is not ahead
    /// of it; anything else leaves `idx` unloaded, to be built from the entries.
    fn load_snapshot(&self, idx: &mut MboxIndex, acct: u32, mbox: u32, mailbox: &Mailbox) -> Result<()> {
        let Some(bytes) = self.meta.get(keys::index_snapshot(acct, mbox))? else { return Ok(()) };
        let Ok(snap) = decode::<Snapshot>(&bytes) else { return Ok(()) };
        if snap.uidvalidity != mailbox.uidvalidity
            || snap.modseq > mailbox.highest_modseq
            || snap.keyword_sets.is_empty()
        {
            return Ok(());
        }
        if snap.rows.iter().any(|r| r.keywords as usize >= snap.keyword_sets.len()) {
            return Ok(());
        }
        idx.keyword_ids = snap.keyword_sets.iter().enumerate().map(|(i, k)| (k.clone(), i as u32)).collect();
        idx.keyword_sets = snap.keyword_sets;
        idx.rows = snap.rows;
        idx.loaded = true;
        idx.uidvalidity = snap.uidvalidity;
        idx.modseq = snap.modseq;
        idx.replayed = 0;
        Ok(())
    }

    /// Saves the index (best effort: it is a cache, and the next start rebuilds without it).
    fn save_snapshot(&self, idx: &mut MboxIndex, acct: u32, mbox: u32) {
        idx.replayed = 0;
        if idx.rows.len() < SNAPSHOT_MIN_ROWS {
            return;
        }
        let snap = Snapshot {
            uidvalidity: idx.uidvalidity,
            modseq: idx.modseq,
            rows: idx.rows.clone(),
            keyword_sets: idx.keyword_sets.clone(),
        };
        if let Err(e) = self.meta.insert(keys::index_snapshot(acct, mbox), encode(&snap)) {
            tracing::warn!("store index-snapshot error={e}");
        }
    }

    fn refresh_index(&self, idx: &mut MboxIndex, acct: u32, mbox: u32, mailbox: &Mailbox) -> Result<()> {
        if !idx.loaded {
            self.load_snapshot(idx, acct, mbox, mailbox)?;
        }
        if !idx.loaded || idx.uidvalidity != mailbox.uidvalidity || idx.modseq > mailbox.highest_modseq {
            idx.clear();
            for item in self.meta.scan_prefix(keys::entry_prefix(acct, mbox)) {
                let (k, v) = item?;
                let entry: Entry = decode(&v)?;
                let row = idx.row(keys::entry_uid(&k), &entry);
                idx.rows.push(row);
            }
            idx.rows.shrink_to_fit();
            idx.loaded = true;
            idx.uidvalidity = mailbox.uidvalidity;
            idx.modseq = mailbox.highest_modseq;
            self.save_snapshot(idx, acct, mbox);
            return Ok(());
        }
        let expunged = self.expunged_since(acct, mbox, idx.modseq)?;
        let changed = self.changed_since(acct, mbox, idx.modseq)?;
        for &uid in &expunged {
            idx.remove(uid);
        }
        for &uid in &changed {
            match self.entry(acct, mbox, uid)? {
                Some(e) => idx.upsert(uid, &e),
                // Expunged after the mailbox record was read: its X key is above, replayed next time.
                None => idx.remove(uid),
            }
        }
        idx.compact_keywords();
        idx.loaded = true;
        idx.uidvalidity = mailbox.uidvalidity;
        idx.modseq = mailbox.highest_modseq;
        idx.replayed += expunged.len() + changed.len();
        if idx.replayed >= SNAPSHOT_AFTER_CHANGES.max(idx.rows.len() / 8) {
            self.save_snapshot(idx, acct, mbox);
        }
        Ok(())
    }

    /// The UIDs flagged `\Deleted` (EXPUNGE, CLOSE, STATUS DELETED), from the index.
    pub fn deleted_uids(&self, acct: u32, mbox: u32) -> Result<Vec<u32>> {
        Ok(self
            .with_view(acct, mbox, |v| v.iter().filter(|s| s.flags.contains(Flags::DELETED)).map(|s| s.uid).collect())?
            .unwrap_or_default())
    }

    /// The sequence number of the first message without `\Seen` (RFC 3501 §6.3.1 `[UNSEEN n]`).
    pub fn first_unseen(&self, acct: u32, mbox: u32) -> Result<Option<usize>> {
        Ok(self
            .with_view(acct, mbox, |v| v.iter().position(|s| !s.flags.contains(Flags::SEEN)).map(|i| i + 1))?
            .flatten())
    }
}

fn is_current(idx: &MboxIndex, mailbox: &Mailbox) -> bool {
    idx.loaded && idx.uidvalidity == mailbox.uidvalidity && idx.modseq == mailbox.highest_modseq
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::{FlagOp, Flags, MessageMeta, Store};

    const USER: &str = "ix@example.org";
    const BOXES: [&str; 3] = ["INBOX", "Work", "Old"];

    #[derive(Debug, Clone)]
    enum Op {
        Append { mbox: u8, n: u8, seen: bool },
        Deliver { seen: bool },
        Flag { mbox: u8, pick: u16, op: u8, kw: u8 },
        Expunge { mbox: u8, pick: u16 },
        Transfer { from: u8, to: u8, pick: u16, mv: bool },
        Recreate { mbox: u8 },
        Look { mbox: u8 },
        // The cached index dropped, as at a restart: the next use starts from the snapshot.
        Forget { mbox: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..3, 1u8..4, any::<bool>()).prop_map(|(mbox, n, seen)| Op::Append { mbox, n, seen }),
            1 => any::<bool>().prop_map(|seen| Op::Deliver { seen }),
            3 => (0u8..3, any::<u16>(), 0u8..3, 0u8..4).prop_map(|(mbox, pick, op, kw)| Op::Flag { mbox, pick, op, kw }),
            2 => (0u8..3, any::<u16>()).prop_map(|(mbox, pick)| Op::Expunge { mbox, pick }),
            2 => (0u8..3, 0u8..3, any::<u16>(), any::<bool>())
                .prop_map(|(from, to, pick, mv)| Op::Transfer { from, to, pick, mv }),
            1 => (1u8..3).prop_map(|mbox| Op::Recreate { mbox }),
            3 => (0u8..3).prop_map(|mbox| Op::Look { mbox }),
            2 => (0u8..3).prop_map(|mbox| Op::Forget { mbox }),
        ]
    }

    fn blob(store: &Store, n: u32) -> super::super::PendingBlob {
        let mut w = store.blob_writer().unwrap();
        w.write(format!("Subject: {n}\r\n\r\nbody {}\r\n", n % 5).as_bytes()).unwrap();
        w.finish().unwrap()
    }

    fn mbox_id(store: &Store, acct: u32, i: u8) -> u32 {
        let name = BOXES[i as usize];
        match store.mailbox_id(acct, name).unwrap() {
            Some(id) => id,
            None => store.create_mailbox(acct, name, None).unwrap(),
        }
    }

    /// Some UIDs of a mailbox, chosen by `pick`'s bits.
    fn some_uids(store: &Store, acct: u32, mbox: u32, pick: u16) -> Vec<u32> {
        let all: Vec<u32> = store.entries(acct, mbox).unwrap().into_iter().map(|(u, _)| u).collect();
        all.iter().enumerate().filter(|(i, _)| pick & (1 << (i % 16)) != 0).map(|(_, u)| *u).collect()
    }

    /// The index view against a full read of sled.
    fn check(store: &Store, acct: u32, mbox: u32) {
        let entries = store.entries(acct, mbox).unwrap();
        let view = store
            .with_view(acct, mbox, |v| {
                v.iter()
                    .map(|s| {
                        (s.uid, s.flags, s.keywords.to_vec(), s.size, s.internal_date, s.tz_offset_minutes, s.modseq)
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap()
            .expect("mailbox exists");
        let expected: Vec<_> = entries
            .iter()
            .map(|(u, e)| (*u, e.flags, e.keywords.clone(), e.size, e.internal_date, e.tz_offset_minutes, e.modseq))
            .collect();
        assert_eq!(view, expected);
        assert_eq!(store.uids(acct, mbox).unwrap(), entries.iter().map(|(u, _)| *u).collect::<Vec<_>>());
        let unseen = entries.iter().position(|(_, e)| !e.flags.contains(Flags::SEEN)).map(|i| i + 1);
        assert_eq!(store.first_unseen(acct, mbox).unwrap(), unseen);
        let deleted: Vec<u32> =
            entries.iter().filter(|(_, e)| e.flags.contains(Flags::DELETED)).map(|(u, _)| *u).collect();
        assert_eq!(store.deleted_uids(acct, mbox).unwrap(), deleted);
    }

    fn apply(store: &Store, acct: u32, op: &Op, counter: &mut u32) {
        let kws = [vec![], vec!["$A".to_string()], vec!["$B".to_string(), "x".to_string()], vec!["$a".to_string()]];
        match *op {
            Op::Append { mbox, n, seen } => {
                let id = mbox_id(store, acct, mbox);
                let items = (0..n)
                    .map(|_| {
                        *counter += 1;
                        let flags = if seen { Flags::SEEN } else { Flags::default() };
                        let meta = MessageMeta {
                            flags,
                            keywords: &kws[(*counter % 3) as usize],
                            internal_date: i64::from(*counter),
                            tz_offset_minutes: (*counter % 7) as i16 * 15,
                        };
                        (blob(store, *counter), meta)
                    })
                    .collect();
                store.append_messages(acct, id, items).unwrap();
            }
            Op::Deliver { seen } => {
                *counter += 1;
                let target = super::super::DeliveryTarget { address: USER, mailbox: "INBOX", seen };
                store.commit_message(blob(store, *counter), &[target], Flags::default(), &[], 5, 0).unwrap();
            }
            Op::Flag { mbox, pick, op, kw } => {
                let id = mbox_id(store, acct, mbox);
                let uids = some_uids(store, acct, id, pick);
                let op = [FlagOp::Add, FlagOp::Remove, FlagOp::Replace][op as usize];
                let flags = if pick & 1 == 0 { Flags::SEEN } else { Flags::FLAGGED.union(Flags::DELETED) };
                store.store_flags(acct, id, &uids, op, flags, &kws[kw as usize]).unwrap();
            }
            Op::Expunge { mbox, pick } => {
                let id = mbox_id(store, acct, mbox);
                let uids = some_uids(store, acct, id, pick);
                store.expunge(acct, id, &uids).unwrap();
            }
            Op::Transfer { from, to, pick, mv } => {
                let (f, t) = (mbox_id(store, acct, from), mbox_id(store, acct, to));
                let uids = some_uids(store, acct, f, pick);
                if mv {
                    store.move_messages(acct, f, &uids, t).unwrap();
                } else {
                    store.copy_messages(acct, f, &uids, t).unwrap();
                }
            }
            Op::Recreate { mbox } => {
                let _ = mbox_id(store, acct, mbox);
                store.delete_mailbox(acct, BOXES[mbox as usize]).unwrap();
                let _ = mbox_id(store, acct, mbox);
            }
            Op::Look { mbox } => {
                let id = mbox_id(store, acct, mbox);
                check(store, acct, id);
            }
            Op::Forget { mbox } => {
                let id = mbox_id(store, acct, mbox);
                store.index.forget(acct, id);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Random writes interleaved with reads: the index always equals what sled holds.
        #[test]
        fn index_follows_sled(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
            let acct = store.ensure_account(USER).unwrap();
            let mut counter = 0;
            for op in &ops {
                apply(&store, acct, op, &mut counter);
            }
            for i in 0..3 {
                let id = mbox_id(&store, acct, i);
                check(&store, acct, id);
            }
        }
    }

    /// Writers on other threads while readers refresh: after they stop, the index is exact.
    #[test]
    fn concurrent_writers_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), "t", 1 << 20).unwrap());
        let acct = store.ensure_account(USER).unwrap();
        let inbox = mbox_id(&store, acct, 0);
        let work = mbox_id(&store, acct, 1);
        let mut writers = Vec::new();
        for t in 0..3u32 {
            let store = store.clone();
            writers.push(std::thread::spawn(move || {
                let mut counter = t * 100_000;
                for i in 0..150u32 {
                    let op = match (i + t) % 5 {
                        0 | 1 => Op::Append { mbox: (i % 2) as u8, n: 2, seen: i % 3 == 0 },
                        2 => Op::Flag {
                            mbox: (i % 2) as u8,
                            pick: (i as u16).wrapping_mul(7919),
                            op: (i % 3) as u8,
                            kw: (i % 4) as u8,
                        },
                        3 => Op::Transfer { from: 0, to: 1, pick: (i as u16).wrapping_mul(31), mv: i % 2 == 0 },
                        _ => Op::Expunge { mbox: 1, pick: (i as u16).wrapping_mul(13) },
                    };
                    apply(&store, acct, &op, &mut counter);
                }
            }));
        }
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..300 {
                    let _ = store.uids(acct, inbox).unwrap();
                    let _ = store.first_unseen(acct, work).unwrap();
                }
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        reader.join().unwrap();
        check(&store, acct, inbox);
        check(&store, acct, work);
    }

    /// Deleting a mailbox drops its index; the limits evict the least recently used.
    #[test]
    fn a_restart_starts_from_the_snapshot_and_replays_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut counter = 0;
        let (acct, inbox) = {
            let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
            let acct = store.ensure_account(USER).unwrap();
            apply(&store, acct, &Op::Append { mbox: 0, n: 5, seen: false }, &mut counter);
            let inbox = mbox_id(&store, acct, 0);
            // Built from the entries, and saved.
            check(&store, acct, inbox);
            // Changes after the snapshot: replayed, not yet saved again (below the threshold).
            apply(&store, acct, &Op::Expunge { mbox: 0, pick: 1 }, &mut counter);
            store.sync_blocking().unwrap();
            (acct, inbox)
        };
        let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
        let snap: super::Snapshot =
            super::decode(&store.meta.get(super::keys::index_snapshot(acct, inbox)).unwrap().unwrap()).unwrap();
        assert_eq!(snap.rows.len(), 5);
        check(&store, acct, inbox);
        // A snapshot of another incarnation of the mailbox (UIDVALIDITY) is not used.
        let mut bad = snap;
        bad.uidvalidity += 1;
        bad.rows.truncate(1);
        store.meta.insert(super::keys::index_snapshot(acct, inbox), super::encode(&bad)).unwrap();
        store.index.forget(acct, inbox);
        check(&store, acct, inbox);
        // Nor one that is ahead of the mailbox, nor garbage.
        bad.uidvalidity -= 1;
        bad.modseq = u64::MAX;
        store.meta.insert(super::keys::index_snapshot(acct, inbox), super::encode(&bad)).unwrap();
        store.index.forget(acct, inbox);
        check(&store, acct, inbox);
        store.meta.insert(super::keys::index_snapshot(acct, inbox), &b"\xff\xff"[..]).unwrap();
        store.index.forget(acct, inbox);
        check(&store, acct, inbox);
        // Deleting the mailbox deletes its snapshot.
        let work = mbox_id(&store, acct, 1);
        apply(&store, acct, &Op::Append { mbox: 1, n: 2, seen: true }, &mut counter);
        check(&store, acct, work);
        assert!(store.meta.get(super::keys::index_snapshot(acct, work)).unwrap().is_some());
        store.delete_mailbox(acct, "Work").unwrap();
        assert!(store.meta.get(super::keys::index_snapshot(acct, work)).unwrap().is_none());
    }

    #[test]
    fn deleted_mailbox_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
        let acct = store.ensure_account(USER).unwrap();
        let id = mbox_id(&store, acct, 1);
        let mut counter = 0;
        apply(&store, acct, &Op::Append { mbox: 1, n: 3, seen: false }, &mut counter);
        assert_eq!(store.uids(acct, id).unwrap(), vec![1, 2, 3]);
        assert_eq!(store.index.cached(), 1);
        store.delete_mailbox(acct, "Work").unwrap();
        assert_eq!(store.with_view(acct, id, |v| v.len()).unwrap(), None);
        assert_eq!(store.uids(acct, id).unwrap(), Vec::<u32>::new());
        assert_eq!(store.index.cached(), 0);
    }
}
