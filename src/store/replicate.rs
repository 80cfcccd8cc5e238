//! The replication log's apply side (issue 8; `docs/design/replication-plan.md` §2.4, §3.2).
//!
//! Records from peers are stored in `R` like local ones (the version vector advances, the clock
//! observes them first so the durability watermark covers them), and then the account's sled state
//! is *reconciled* to the merged view (`sync::merge::AccountState::view`): mailboxes by GUID,
//! messages by message id. The effects of a reconcile log no `C` or `R` record (they follow from
//! records already logged) but otherwise write what a local change writes: modseqs, `S`/`X` keys,
//! counters, body references, `J`/`L` keys and IDLE notifications, so IMAP sessions see
//! replicated changes exactly as they see local ones.
//!
//! Rule 4 of the plan (`sync::projection`): a message the view puts at a UID below the mailbox's
//! UIDNEXT here, and not already shown there, is *held* (not shown) and reported to the
//! allocator, which renumbers it; so is a message whose body has not arrived, and one the view
//! has not numbered (`pending`). The held set lives in memory and every reconcile recomputes it.
//!
//! Cost: a reconcile computes the whole view and reads every mailbox of the account (its entries
//! and `J` keys), so it is O(account) per applied batch of up to `engine::BATCH` records. The
//! merged state is cached per account and caught up from `R` by its own vector (which also picks
//! up local writes), so the log is read once per process.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use super::message::{add_counts, remove_counts};
use super::{decode, encode, keys, Account, BlobMeta, ChangeId, Entry, Mailbox, Result, Store, VersionVector};
use crate::sync::merge::{AccountState, Body, Guid, MsgId, Op, Record, Snapshot, View, ViewMailbox, ViewMessage};
use crate::sync::projection::{self, Report};

/// Per account, the merged state of every `R` record held, with what a reconcile needs beside it.
#[derive(Default)]
pub(super) struct Cache {
    pub(super) accounts: Mutex<HashMap<u32, Merged>>,
}

#[derive(Default)]
pub(super) struct Merged {
    state: AccountState,
    /// The records `state` holds; caught up from `R` before every use.
    vector: VersionVector,
    /// Internal date and zone of each message (the view carries only what IMAP flags need).
    bodies: HashMap<MsgId, Body>,
    /// Mailboxes some record created: only those are deleted when absent from the view, so a
    /// mailbox the log does not describe is never removed by a reconcile.
    known: HashSet<Guid>,
    /// Mailboxes some record deleted: the view may still keep one (add wins), and this node may
    /// have shown UIDs in it before it went here.
    deleted: HashSet<Guid>,
    /// Each message's mailbox, and the largest UID any record claimed for it.
    guid_of: HashMap<MsgId, Guid>,
    claims: HashMap<MsgId, u32>,
    /// Per mailbox, the messages the view has and this node does not show (rule 4).
    held: BTreeMap<Guid, BTreeSet<MsgId>>,
    /// Messages the view numbers that are not shown for want of their body.
    waiting: HashSet<MsgId>,
    /// The store matches `state` as of the last reconcile.
    reconciled: bool,
}

impl Merged {
    fn add(&mut self, r: &Record) {
        match &r.op {
            Op::MailboxCreate { guid, .. } => {
                self.known.insert(*guid);
            }
            Op::Append { guid, body, uid, .. } | Op::Move { to: guid, body, uid, .. } => {
                self.bodies.insert(r.id, body.clone());
                self.guid_of.insert(r.id, *guid);
                if let Some(uid) = uid {
                    self.claim(r.id, *uid);
                }
            }
            Op::MailboxDelete { guid, .. } => {
                self.deleted.insert(*guid);
            }
            Op::UidAssign { assignments } => {
                for &(msg, uid) in assignments {
                    self.claim(msg, uid);
                }
            }
            _ => {}
        }
        self.state.apply(r);
        self.vector.advance(r.id);
        self.reconciled = false;
    }

    fn claim(&mut self, msg: MsgId, uid: u32) {
        let c = self.claims.entry(msg).or_default();
        *c = (*c).max(uid);
    }

    /// The merged state of a base snapshot, with the side tables its records would have filled.
    pub(super) fn from_snapshot(snapshot: &Snapshot) -> Merged {
        let mut merged = Merged::default();
        merged.join_snapshot(snapshot);
        merged
    }

    /// Adds a snapshot (a peer's, installed here): the state of both record sets.
    pub(super) fn join_snapshot(&mut self, snapshot: &Snapshot) {
        for (msg, guid, body) in snapshot.state.message_facts() {
            self.bodies.insert(msg, body.clone());
            self.guid_of.insert(msg, guid);
        }
        for (guid, created, deleted) in snapshot.state.mailbox_facts() {
            if created {
                self.known.insert(guid);
            }
            if deleted {
                self.deleted.insert(guid);
            }
        }
        for (&msg, &uid) in snapshot.state.max_claims() {
            self.claim(msg, uid);
        }
        self.state.join(&snapshot.state);
        self.vector.join(&snapshot.vector);
        self.reconciled = false;
    }

    /// Where a mailbox (re)created here must start numbering. A mailbox some node deleted may
    /// come back under its GUID and UIDVALIDITY (add wins) after this node removed it, and its
    /// UIDs must not start over (RFC 9051 §2.3.1.1): every UID this node can have shown in it
    /// was claimed by a record, so numbering resumes above every claim; messages below are held
    /// and renumbered. A mailbox never deleted starts at 1.
    fn first_uid(&self, guid: &Guid) -> u32 {
        if !self.deleted.contains(guid) {
            return 1;
        }
        let max = self.claims.iter().filter(|(m, _)| self.guid_of.get(*m) == Some(guid)).map(|(_, u)| *u).max();
        max.map_or(1, |u| u.saturating_add(1))
    }
}

/// One message `appends_only` found safe to insert without a reconcile.
struct FastAppend {
    msg: MsgId,
    mbox: u32,
    uid: u32,
    body: Body,
    flags: crate::store::Flags,
    keywords: Vec<String>,
}

/// What a reconcile did, to finish once its batch is applied.
#[derive(Default)]
pub(super) struct Effects {
    touched: BTreeSet<u32>,
    dead: Vec<u64>,
}

/// What one reconcile accumulates across mailboxes.
#[derive(Default)]
struct Pass {
    /// Net change of each body's reference count, settled once at the end.
    refs: HashMap<[u8; 32], i64>,
    /// Messages given a UID by this reconcile.
    inserted: HashSet<MsgId>,
    /// Whether a body is stored here, as of the start of the reconcile.
    present: HashMap<[u8; 32], bool>,
    /// Numbered messages left unshown because their body is missing.
    waiting: HashSet<MsgId>,
}

impl Pass {
    fn has_body(&mut self, store: &Store, hash: &[u8; 32]) -> Result<bool> {
        if let Some(p) = self.present.get(hash) {
            return Ok(*p);
        }
        let p = store.blob_meta(hash)?.is_some();
        self.present.insert(*hash, p);
        Ok(p)
    }
}

/// A message as it is stored in one local mailbox.
struct Local {
    msg: Option<MsgId>,
    entry: Entry,
}

fn msg_at_value(mbox: u32, uid: u32) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&mbox.to_be_bytes());
    v[4..].copy_from_slice(&uid.to_be_bytes());
    v
}

fn msg_id_prefix(acct: u32, mbox: u32) -> Vec<u8> {
    keys::msg_id(acct, mbox, 0)[..9].to_vec()
}

fn sorted(keywords: &[String]) -> Vec<&String> {
    let mut k: Vec<&String> = keywords.iter().collect();
    k.sort();
    k.dedup();
    k
}

impl Store {
    /// Every account address held here (replication offers each to its peers).
    pub fn account_addresses(&self) -> Result<Vec<String>> {
        self.meta
            .scan_prefix([keys::ACCOUNT_BY_NAME])
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[1..]).into_owned()))
            .collect()
    }

    /// The account's `R` records that `after` does not cover and that are durable (HLC at or
    /// below `durable_hlc`), in (hlc, node) order, at most `limit`: what a peer holding `after`
    /// may be sent. A record shipped before it is on disk could be lost in a crash and its id
    /// reused for other content.
    pub fn replicated_page(&self, acct: u32, after: &VersionVector, limit: usize) -> Result<Vec<Record>> {
        self.replicated_range(acct, after, limit, self.durable_hlc())
    }

    /// `R` records not covered by `after` with an HLC at most `max_hlc`, read from the smallest
    /// HLC `after` holds for a node of the account's vector (everything below is covered).
    pub(super) fn replicated_range(
        &self,
        acct: u32,
        after: &VersionVector,
        limit: usize,
        max_hlc: u64,
    ) -> Result<Vec<Record>> {
        let held = self.vector(acct)?;
        if held.iter().all(|(node, hlc)| hlc <= after.get(node)) {
            return Ok(Vec::new());
        }
        let floor = held.iter().map(|(node, _)| after.get(node)).min().unwrap_or(0);
        let prefix = keys::replicated_prefix(acct);
        let start = keys::replicated(acct, floor.saturating_add(1), 0).to_vec();
        let mut out = Vec::new();
        for item in self.meta.range(start..keys::prefix_end(&prefix)) {
            let (k, v) = item?;
            let (hlc, node) = keys::change_parts(&k);
            if hlc > max_hlc || out.len() >= limit {
                break;
            }
            if hlc > after.get(node) {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    /// Stores the records of `address`'s account that its vector does not cover (creating the
    /// account when it is new) and brings the account's mailboxes in line with the merged view,
    /// in one batch. Returns how many records were new; a batch applied twice changes nothing.
    pub fn apply_replicated(&self, address: &str, records: &[Record]) -> Result<usize> {
        let _guard = self.write.lock().expect("store lock");
        let acct = self.ensure_account_locked(address)?;
        let mut vector = self.vector(acct)?;
        let mut fresh = Vec::new();
        for r in records {
            if !vector.covers(r.id) {
                vector.advance(r.id);
                fresh.push(r);
            }
        }
        if fresh.is_empty() {
            return Ok(0);
        }
        // Before anything is written: the watermark read under this lock then covers them.
        if let Some(max) = fresh.iter().map(|r| r.id.hlc).max() {
            self.clock.observe(max);
        }
        let mut batch = sled::Batch::default();
        let mut nodes = BTreeSet::new();
        for r in &fresh {
            batch.insert(&keys::replicated(acct, r.id.hlc, r.id.node), encode(*r));
            nodes.insert(r.id.node);
        }
        for node in nodes {
            batch.insert(&keys::vector(acct, node), &vector.get(node).to_be_bytes());
        }
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| {
            let plan = self.appends_only(acct, merged, &fresh)?;
            for r in &fresh {
                merged.add(r);
            }
            match plan {
                Some(plan) => self.apply_appends(batch, acct, merged, plan),
                None => self.reconcile_and_apply(batch, acct, merged),
            }
        });
        self.finish(&mut cache, acct, outcome)?;
        Ok(fresh.len())
    }

    /// The common case of a catch-up or of steady delivery elsewhere: every new record is an
    /// `Append` of a message no record named before, into a live mailbox here, at a UID at or
    /// above its UIDNEXT (in order), with its body present, while the store already matches the
    /// merged state and holds nothing back. Then the merged view differs from what the store
    /// shows by exactly these messages at exactly these UIDs (a message elsewhere claiming such
    /// a UID would be shown here, or held), so they can be inserted without recomputing the
    /// view: a reconcile is O(account), this is O(batch). `None` when any condition fails.
    fn appends_only(&self, acct: u32, merged: &Merged, fresh: &[&Record]) -> Result<Option<Vec<FastAppend>>> {
        if !merged.reconciled || !merged.waiting.is_empty() || merged.held.values().any(|h| !h.is_empty()) {
            return Ok(None);
        }
        let mut next: HashMap<u32, u32> = HashMap::new();
        let mut plan = Vec::with_capacity(fresh.len());
        for r in fresh {
            let Op::Append { guid, uid: Some(uid), body, flags, keywords } = &r.op else { return Ok(None) };
            if merged.deleted.contains(guid) || !merged.known.contains(guid) || !merged.state.untouched(r.id) {
                return Ok(None);
            }
            let Some(mbox) = self.mailbox_by_guid(acct, guid)? else { return Ok(None) };
            let uidnext = match next.get(&mbox) {
                Some(n) => *n,
                None => match self.mailbox(acct, mbox)? {
                    Some(m) => m.uidnext,
                    None => return Ok(None),
                },
            };
            if *uid < uidnext || *uid == u32::MAX || self.blob_meta(&body.blob)?.is_none() {
                return Ok(None);
            }
            next.insert(mbox, uid + 1);
            plan.push(FastAppend {
                msg: r.id,
                mbox,
                uid: *uid,
                body: body.clone(),
                flags: *flags,
                keywords: keywords.clone(),
            });
        }
        Ok(Some(plan))
    }

    /// Inserts `appends_only`'s messages as a reconcile would (entry, modseq, `J`/`L`, counters,
    /// body reference), in the batch that stores their records.
    fn apply_appends(
        &self,
        mut batch: sled::Batch,
        acct: u32,
        merged: &mut Merged,
        plan: Vec<FastAppend>,
    ) -> Result<Effects> {
        let mut account = self.load_account(acct)?;
        let mut effects = Effects::default();
        let mut refs: HashMap<[u8; 32], i64> = HashMap::new();
        let mut boxes: BTreeMap<u32, Mailbox> = BTreeMap::new();
        for a in plan {
            let mailbox = match boxes.entry(a.mbox) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let Some(m) = self.mailbox(acct, a.mbox)? else { continue };
                    v.insert(m)
                }
            };
            account.modseq += 1;
            let entry = Entry {
                blob: a.body.blob,
                size: a.body.size,
                internal_date: a.body.internal_date,
                tz_offset_minutes: a.body.tz_offset_minutes,
                flags: a.flags,
                keywords: a.keywords,
                modseq: account.modseq,
            };
            add_counts(mailbox, &entry);
            batch.insert(&keys::entry(acct, a.mbox, a.uid), encode(&entry));
            batch.insert(&keys::modseq(acct, a.mbox, account.modseq, a.uid), &[]);
            batch.insert(&keys::msg_id(acct, a.mbox, a.uid), &keys::msg_id_value(a.msg.hlc, a.msg.node));
            batch.insert(&keys::msg_at(acct, a.msg.hlc, a.msg.node), &msg_at_value(a.mbox, a.uid));
            *refs.entry(a.body.blob).or_default() += 1;
            mailbox.uidnext = a.uid + 1;
            mailbox.highest_modseq = account.modseq;
            effects.touched.insert(a.mbox);
        }
        for (id, mailbox) in &boxes {
            batch.insert(&keys::mailbox(acct, *id), encode(mailbox));
        }
        self.settle_refs(&mut batch, refs, &mut effects.dead)?;
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        merged.reconciled = true;
        Ok(effects)
    }

    /// Per mailbox this node's UIDNEXT and the messages it holds back (`projection::Report`).
    pub fn replication_reports(&self, acct: u32) -> Result<BTreeMap<Guid, Report>> {
        let _guard = self.write.lock().expect("store lock");
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| self.reconcile_if_stale(acct, merged));
        self.finish(&mut cache, acct, outcome)?;
        let merged = cache.get(&acct).expect("caught up above");
        self.reports_locked(acct, merged)
    }

    /// The digest (`merge::View::digest`) of what this node shows, with the messages it holds
    /// back (rule 4) or lacks a body for put where the merged view has them. It equals the
    /// merged state's digest exactly when the store matches its records, so two nodes with the
    /// same records compare what their clients see, not only the records (anti-entropy).
    pub fn shown_digest(&self, acct: u32) -> Result<[u8; 32]> {
        let _guard = self.write.lock().expect("store lock");
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| self.reconcile_if_stale(acct, merged));
        self.finish(&mut cache, acct, outcome)?;
        let merged = cache.get(&acct).expect("caught up above");
        let view = merged.state.view();
        let mut shown = View::default();
        for info in self.list_mailboxes(acct)? {
            let Some(guid) = self.mailbox_guid(acct, info.id)? else { continue };
            let m = &info.mailbox;
            let mut b = ViewMailbox {
                name: m.name.clone(),
                uidvalidity: m.uidvalidity,
                subscribed: m.subscribed,
                special_use: m.special_use,
                messages: BTreeMap::new(),
                pending: BTreeMap::new(),
            };
            let mut ids = HashMap::new();
            for item in self.meta.scan_prefix(msg_id_prefix(acct, info.id)) {
                let (k, v) = item?;
                if let Some((hlc, node)) = keys::msg_id_parts(&v) {
                    ids.insert(keys::entry_uid(&k), ChangeId { hlc, node });
                }
            }
            for (uid, e) in self.entries(acct, info.id)? {
                let Some(msg) = ids.get(&uid) else { continue };
                let mut keywords = e.keywords;
                keywords.sort();
                keywords.dedup();
                b.messages.insert(uid, (*msg, ViewMessage { blob: e.blob, size: e.size, flags: e.flags, keywords }));
            }
            if let Some(vb) = view.mailboxes.get(&guid) {
                let held = merged.held.get(&guid);
                let hidden = |msg: &MsgId| held.is_some_and(|h| h.contains(msg)) || merged.waiting.contains(msg);
                for (msg, row) in vb.pending.iter().filter(|(msg, _)| hidden(msg)) {
                    b.pending.insert(*msg, row.clone());
                }
                for (uid, (msg, row)) in vb.messages.iter().filter(|(_, (msg, _))| hidden(msg)) {
                    b.messages.entry(*uid).or_insert((*msg, row.clone()));
                }
            }
            shown.mailboxes.insert(guid, b);
        }
        Ok(shown.digest())
    }

    /// The allocator's step (plan §2.4 rule 5): numbers every message pending here or held by
    /// this node or a peer that reported, by committing a local `UidAssign` record (in `R` only:
    /// it has no local-history twin), and applies it. False when there was nothing to number.
    pub fn allocate_uids(&self, acct: u32, peer_reports: &[&BTreeMap<Guid, Report>]) -> Result<bool> {
        let _guard = self.write.lock().expect("store lock");
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| self.reconcile_if_stale(acct, merged));
        self.finish(&mut cache, acct, outcome)?;
        let merged = cache.get_mut(&acct).expect("caught up above");
        let own = self.reports_locked(acct, merged)?;
        let view = merged.state.view();
        let all: Vec<&BTreeMap<Guid, Report>> = std::iter::once(&own).chain(peer_reports.iter().copied()).collect();
        let Some(op) = projection::allocation(&view, all.iter().copied()) else { return Ok(false) };
        let record = Record { id: ChangeId { hlc: self.clock.tick(), node: self.node }, op };
        let mut batch = sled::Batch::default();
        batch.insert(&keys::replicated(acct, record.id.hlc, record.id.node), encode(&record));
        batch.insert(&keys::vector(acct, record.id.node), &record.id.hlc.to_be_bytes());
        merged.add(&record);
        let outcome = self.reconcile_and_apply(batch, acct, merged);
        self.finish(&mut cache, acct, outcome)?;
        Ok(true)
    }

    /// The bodies the messages these records create name and this node lacks.
    pub fn missing_blobs(&self, hashes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for hash in hashes {
            if !out.contains(hash) && self.blob_meta(hash)?.is_none() {
                out.push(*hash);
            }
        }
        Ok(out)
    }

    /// Keeps a body fetched from a peer for the batch that will reference it. False when the
    /// bytes do not hash to `hash`. It is stored with no reference and a `P` marker naming the
    /// hash: the first entry that references it removes the marker; if none does before the next
    /// start, `recover` removes it (`recover_fetched_blob`).
    pub fn write_blob(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<bool> {
        if blake3::hash(bytes).as_bytes() != hash {
            return Ok(false);
        }
        if self.blob_meta(hash)?.is_some() {
            return Ok(true);
        }
        let mut writer = self.blob_writer()?;
        writer.write(bytes)?;
        let blob = writer.finish()?;
        let _guard = self.write.lock().expect("store lock");
        if self.blob_meta(hash)?.is_some() {
            drop(_guard);
            self.discard(blob)?;
            return Ok(true);
        }
        let mut batch = sled::Batch::default();
        let meta = BlobMeta { id: blob.id, size: blob.size, chunks: blob.chunks, refs: 0 };
        batch.insert(&keys::blob(hash)[..], encode(&meta));
        batch.insert(&keys::pending_blob(blob.id), &hash[..]);
        self.meta.apply_batch(batch)?;
        Ok(true)
    }

    /// At open, for a `P` marker that names a hash (a fetched body, `write_blob`): a body some
    /// entry references since keeps its chunks and loses the marker; an unreferenced one goes.
    pub(super) fn recover_fetched_blob(&self, id: u64, hash: &[u8]) -> Result<()> {
        let hash: Option<[u8; 32]> = hash.try_into().ok();
        let meta = match hash {
            Some(h) => self.blob_meta(&h)?.filter(|m| m.id == id),
            None => None,
        };
        match (hash, meta) {
            (Some(_), Some(m)) if m.refs > 0 => {}
            (Some(h), Some(_)) => {
                self.meta.remove(&keys::blob(&h)[..])?;
                self.remove_chunks(id)?;
            }
            _ => self.remove_chunks(id)?,
        }
        self.meta.remove(keys::pending_blob(id))?;
        Ok(())
    }

    /// The account's merged state, first built from its base snapshot, then caught up from `R`.
    pub(super) fn catch_up<'a>(&self, cache: &'a mut HashMap<u32, Merged>, acct: u32) -> Result<&'a mut Merged> {
        let merged = match cache.entry(acct) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Merged::from_snapshot(&self.replication_base(acct)?))
            }
        };
        for r in self.replicated_range(acct, &merged.vector, usize::MAX, u64::MAX)? {
            merged.add(&r);
        }
        Ok(merged)
    }

    fn reconcile_if_stale(&self, acct: u32, merged: &mut Merged) -> Result<Effects> {
        if merged.reconciled {
            return Ok(Effects::default());
        }
        self.reconcile_and_apply(sled::Batch::default(), acct, merged)
    }

    pub(super) fn reconcile_and_apply(
        &self,
        mut batch: sled::Batch,
        acct: u32,
        merged: &mut Merged,
    ) -> Result<Effects> {
        let effects = self.reconcile(&mut batch, acct, merged)?;
        self.apply(batch)?;
        merged.reconciled = true;
        Ok(effects)
    }

    /// After a reconcile's batch: a failure forgets the account's cache (it may hold records
    /// that were not written); success releases dead bodies and wakes IMAP sessions.
    pub(super) fn finish(&self, cache: &mut HashMap<u32, Merged>, acct: u32, outcome: Result<Effects>) -> Result<()> {
        let effects = match outcome {
            Ok(e) => e,
            Err(e) => {
                cache.remove(&acct);
                return Err(e);
            }
        };
        self.drop_dead_blobs(&effects.dead)?;
        for mbox in effects.touched {
            self.notify(acct, mbox);
        }
        Ok(())
    }

    fn reports_locked(&self, acct: u32, merged: &Merged) -> Result<BTreeMap<Guid, Report>> {
        let mut out = BTreeMap::new();
        // The last reconcile left one held set per view mailbox it keeps here.
        for (guid, held) in &merged.held {
            let Some(mbox) = self.mailbox_by_guid(acct, guid)? else { continue };
            let Some(mailbox) = self.mailbox(acct, mbox)? else { continue };
            out.insert(*guid, Report { uidnext: mailbox.uidnext, held: held.iter().copied().collect() });
        }
        Ok(out)
    }

    /// Adds to `batch` what makes the account's mailboxes match the merged view, and recomputes
    /// the held sets. Reads only committed state: nothing in `batch` may touch mailbox state.
    fn reconcile(&self, batch: &mut sled::Batch, acct: u32, merged: &mut Merged) -> Result<Effects> {
        let view: View = merged.state.view();
        let mut account = self.load_account(acct)?;
        let mut effects = Effects::default();
        let mut pass = Pass::default();
        let mut local: BTreeMap<Guid, (u32, Mailbox)> = BTreeMap::new();
        // Names that stay taken by mailboxes the view does not manage.
        let mut occupied: HashSet<String> = HashSet::new();
        for info in self.list_mailboxes(acct)? {
            match self.mailbox_guid(acct, info.id)? {
                Some(guid) if view.mailboxes.contains_key(&guid) => {
                    local.insert(guid, (info.id, info.mailbox));
                }
                Some(guid) if merged.known.contains(&guid) => {
                    self.remove_mailbox(batch, acct, info.id, &info.mailbox, &guid, &mut pass.refs)?;
                    account.modseq += 1;
                    effects.touched.insert(info.id);
                }
                _ => {
                    occupied.insert(info.mailbox.name);
                }
            }
        }
        // Names leave before any arrives: two mailboxes may swap names in one reconcile.
        for (guid, (_, mailbox)) in &local {
            if view.mailboxes.get(guid).is_some_and(|b| b.name != mailbox.name) {
                batch.remove(keys::mailbox_by_name(acct, &mailbox.name));
            }
        }
        let mut held = BTreeMap::new();
        let mut ids: HashMap<Guid, u32> = HashMap::new();
        for (guid, b) in &view.mailboxes {
            if occupied.contains(&b.name) {
                tracing::warn!("replication: mailbox name taken locally account={acct} name={}", b.name);
                if let Some((_, mailbox)) = local.get(guid) {
                    if mailbox.name != b.name {
                        batch.insert(keys::mailbox_by_name(acct, &mailbox.name), &local[guid].0.to_be_bytes());
                    }
                }
                continue;
            }
            let (id, mailbox) = match local.remove(guid) {
                Some(found) => found,
                None => {
                    let id = account.next_mailbox_id;
                    account.next_mailbox_id += 1;
                    account.modseq += 1;
                    account.last_uidvalidity = account.last_uidvalidity.max(b.uidvalidity);
                    batch.insert(keys::mailbox_by_name(acct, &b.name), &id.to_be_bytes());
                    batch.insert(&keys::mailbox_guid(acct, id), guid);
                    batch.insert(&keys::mailbox_by_guid(acct, guid), &id.to_be_bytes());
                    let mailbox = Mailbox {
                        name: b.name.clone(),
                        uidvalidity: b.uidvalidity,
                        uidnext: merged.first_uid(guid),
                        highest_modseq: account.modseq,
                        special_use: b.special_use,
                        subscribed: b.subscribed,
                        messages: 0,
                        unseen: 0,
                        size: 0,
                    };
                    batch.insert(&keys::mailbox(acct, id), encode(&mailbox));
                    effects.touched.insert(id);
                    (id, mailbox)
                }
            };
            ids.insert(*guid, id);
            let held_here = self.reconcile_mailbox(batch, acct, &mut account, id, mailbox, b, merged, &mut pass)?;
            if let Some(changed) = held_here.1 {
                effects.touched.insert(changed);
            }
            held.insert(*guid, held_here.0);
        }
        self.keep_held_bodies(batch, acct, &held, &ids, merged, &mut pass)?;
        self.settle_refs(batch, pass.refs, &mut effects.dead)?;
        batch.insert(&keys::account(acct), encode(&account));
        merged.held = held;
        merged.waiting = pass.waiting;
        Ok(effects)
    }

    /// One mailbox of the view: its attributes, then its messages. Returns the held set and the
    /// mailbox id when anything changed.
    #[allow(clippy::too_many_arguments)]
    fn reconcile_mailbox(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        account: &mut Account,
        id: u32,
        mut mailbox: Mailbox,
        b: &ViewMailbox,
        merged: &Merged,
        pass: &mut Pass,
    ) -> Result<(BTreeSet<MsgId>, Option<u32>)> {
        let before = mailbox.clone();
        let start_modseq = account.modseq;
        if mailbox.name != b.name {
            // RENAME: the old name's `N` key is already gone.
            batch.insert(keys::mailbox_by_name(acct, &b.name), &id.to_be_bytes());
            mailbox.name = b.name.clone();
            account.modseq += 1;
        }
        if mailbox.subscribed != b.subscribed || mailbox.special_use != b.special_use {
            mailbox.subscribed = b.subscribed;
            mailbox.special_use = b.special_use;
            account.modseq += 1;
        }
        let mut entries: BTreeMap<u32, Local> = BTreeMap::new();
        for (uid, entry) in self.entries(acct, id)? {
            entries.insert(uid, Local { msg: None, entry });
        }
        for item in self.meta.scan_prefix(msg_id_prefix(acct, id)) {
            let (k, v) = item?;
            if let (Some(local), Some((hlc, node))) = (entries.get_mut(&keys::entry_uid(&k)), keys::msg_id_parts(&v)) {
                local.msg = Some(ChangeId { hlc, node });
            }
        }
        if mailbox.uidvalidity != b.uidvalidity {
            // Another node created this (default) mailbox independently with a larger
            // UIDVALIDITY, which the merge keeps: clients must forget every UID they saw here
            // (RFC 9051 §2.3.1.1), so the mailbox starts over under the new one.
            for (uid, l) in std::mem::take(&mut entries) {
                self.drop_entry(batch, acct, id, uid, &l, &mut pass.refs);
            }
            for kind in [keys::EXPUNGED, keys::MODSEQ] {
                for k in self.meta.scan_prefix(keys::mbox_seq_prefix(kind, acct, id)).keys() {
                    batch.remove(k?);
                }
            }
            batch.remove(&keys::index_snapshot(acct, id));
            mailbox.uidvalidity = b.uidvalidity;
            mailbox.uidnext = 1;
            (mailbox.messages, mailbox.unseen, mailbox.size) = (0, 0, 0);
            account.last_uidvalidity = account.last_uidvalidity.max(b.uidvalidity);
            account.modseq += 1;
        }
        let mut shown: HashSet<MsgId> = HashSet::new();
        for (uid, l) in &mut entries {
            // An entry without a message id is not the log's to manage (see `replog`).
            let Some(msg) = l.msg else { continue };
            match b.messages.get(uid) {
                Some((m, row)) if *m == msg => {
                    shown.insert(msg);
                    let same_keywords = sorted(&l.entry.keywords) == sorted(&row.keywords);
                    if l.entry.flags == row.flags && same_keywords {
                        continue;
                    }
                    remove_counts(&mut mailbox, &l.entry);
                    batch.remove(&keys::modseq(acct, id, l.entry.modseq, *uid));
                    account.modseq += 1;
                    l.entry.flags = row.flags;
                    l.entry.keywords = row.keywords.clone();
                    l.entry.modseq = account.modseq;
                    add_counts(&mut mailbox, &l.entry);
                    batch.insert(&keys::entry(acct, id, *uid), encode(&l.entry));
                    batch.insert(&keys::modseq(acct, id, account.modseq, *uid), &[]);
                }
                _ => {
                    account.modseq += 1;
                    remove_counts(&mut mailbox, &l.entry);
                    self.drop_entry(batch, acct, id, *uid, l, &mut pass.refs);
                    batch.insert(&keys::expunged(acct, id, account.modseq, *uid), &[]);
                }
            }
        }
        let mut held: BTreeSet<MsgId> = b.pending.keys().copied().collect();
        for (&uid, (msg, row)) in &b.messages {
            if shown.contains(msg) {
                continue;
            }
            let body = merged.bodies.get(msg);
            let has_body = pass.has_body(self, &row.blob)?;
            let next = uid.checked_add(1);
            let (Some(next), true) = (next, uid >= mailbox.uidnext) else {
                held.insert(*msg);
                continue;
            };
            // Its UID is fine but its body never came (the pusher had expunged it): not shown,
            // and not reported either, since renumbering would not help and the allocator would
            // number it again on every round. The expunge that explains it follows.
            let (Some(body), true) = (body, has_body) else {
                pass.waiting.insert(*msg);
                continue;
            };
            account.modseq += 1;
            let entry = Entry {
                blob: row.blob,
                size: row.size,
                internal_date: body.internal_date,
                tz_offset_minutes: body.tz_offset_minutes,
                flags: row.flags,
                keywords: row.keywords.clone(),
                modseq: account.modseq,
            };
            add_counts(&mut mailbox, &entry);
            batch.insert(&keys::entry(acct, id, uid), encode(&entry));
            batch.insert(&keys::modseq(acct, id, account.modseq, uid), &[]);
            batch.insert(&keys::msg_id(acct, id, uid), &keys::msg_id_value(msg.hlc, msg.node));
            batch.insert(&keys::msg_at(acct, msg.hlc, msg.node), &msg_at_value(id, uid));
            *pass.refs.entry(row.blob).or_default() += 1;
            pass.inserted.insert(*msg);
            mailbox.uidnext = next;
        }
        if account.modseq == start_modseq && mailbox == before {
            return Ok((held, None));
        }
        mailbox.highest_modseq = account.modseq;
        batch.insert(&keys::mailbox(acct, id), encode(&mailbox));
        Ok((held, Some(id)))
    }

    /// A held message keeps its body: its `L` key says (mailbox, UID 0) and counts as one
    /// reference, so the body survives (a restart too) until the message is shown, which takes
    /// the reference over, or leaves the view. Without it, the expunge that moves a conflicting
    /// message aside would drop the body its renumbered copy needs.
    fn keep_held_bodies(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        held: &BTreeMap<Guid, BTreeSet<MsgId>>,
        ids: &HashMap<Guid, u32>,
        merged: &Merged,
        pass: &mut Pass,
    ) -> Result<()> {
        let mut before: HashMap<MsgId, u32> = HashMap::new();
        for item in self.meta.scan_prefix(&keys::msg_at(acct, 0, 0)[..5]) {
            let (k, v) = item?;
            if v.len() == 8 && v[4..] == [0, 0, 0, 0] {
                let (hlc, node) = keys::change_parts(&k);
                let mbox = u32::from_be_bytes(v[..4].try_into().expect("4 of 8 bytes"));
                before.insert(ChangeId { hlc, node }, mbox);
            }
        }
        let mut wanted: HashMap<MsgId, (u32, [u8; 32])> = HashMap::new();
        for (guid, msgs) in held {
            let Some(&mbox) = ids.get(guid) else { continue };
            for msg in msgs {
                let Some(body) = merged.bodies.get(msg) else { continue };
                if pass.has_body(self, &body.blob)? {
                    wanted.insert(*msg, (mbox, body.blob));
                }
            }
        }
        for (msg, mbox) in &before {
            if wanted.get(msg).is_some_and(|(m, _)| m == mbox) {
                continue;
            }
            if let Some(body) = merged.bodies.get(msg) {
                *pass.refs.entry(body.blob).or_default() -= 1;
            }
            if !pass.inserted.contains(msg) {
                batch.remove(&keys::msg_at(acct, msg.hlc, msg.node));
            }
        }
        for (msg, (mbox, blob)) in wanted {
            if before.get(&msg) != Some(&mbox) {
                *pass.refs.entry(blob).or_default() += 1;
                batch.insert(&keys::msg_at(acct, msg.hlc, msg.node), &msg_at_value(mbox, 0));
            }
        }
        Ok(())
    }

    /// Removes one entry's keys (`E`, `S`, `J`, `L`) and its body reference; the caller writes
    /// the `X` key when clients must be told.
    fn drop_entry(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        id: u32,
        uid: u32,
        l: &Local,
        refs: &mut HashMap<[u8; 32], i64>,
    ) {
        batch.remove(&keys::entry(acct, id, uid));
        batch.remove(&keys::modseq(acct, id, l.entry.modseq, uid));
        batch.remove(&keys::msg_id(acct, id, uid));
        if let Some(msg) = l.msg {
            batch.remove(&keys::msg_at(acct, msg.hlc, msg.node));
        }
        *refs.entry(l.entry.blob).or_default() -= 1;
    }

    /// A mailbox the view no longer has: everything `delete_mailbox` removes, without a record.
    fn remove_mailbox(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        id: u32,
        mailbox: &Mailbox,
        guid: &Guid,
        refs: &mut HashMap<[u8; 32], i64>,
    ) -> Result<()> {
        for item in self.meta.scan_prefix(keys::entry_prefix(acct, id)) {
            let (k, v) = item?;
            let entry: Entry = decode(&v)?;
            batch.remove(k);
            *refs.entry(entry.blob).or_default() -= 1;
        }
        for item in self.meta.scan_prefix(msg_id_prefix(acct, id)) {
            let (k, v) = item?;
            if let Some((hlc, node)) = keys::msg_id_parts(&v) {
                batch.remove(&keys::msg_at(acct, hlc, node));
            }
            batch.remove(k);
        }
        for kind in [keys::MODSEQ, keys::EXPUNGED] {
            for k in self.meta.scan_prefix(keys::mbox_seq_prefix(kind, acct, id)).keys() {
                batch.remove(k?);
            }
        }
        batch.remove(&keys::index_snapshot(acct, id));
        batch.remove(&keys::mailbox(acct, id));
        batch.remove(keys::mailbox_by_name(acct, &mailbox.name));
        batch.remove(&keys::mailbox_guid(acct, id));
        batch.remove(&keys::mailbox_by_guid(acct, guid));
        Ok(())
    }

    /// Applies the net reference change of every body a reconcile touched, as `release_blobs`
    /// and the commit paths do: at zero a body is unindexed and marked for removal; a fetched
    /// body referenced for the first time loses its `P` marker.
    fn settle_refs(&self, batch: &mut sled::Batch, refs: HashMap<[u8; 32], i64>, dead: &mut Vec<u64>) -> Result<()> {
        for (hash, delta) in refs {
            if delta == 0 {
                continue;
            }
            let Some(mut meta) = self.blob_meta(&hash)? else { continue };
            let before = meta.refs;
            meta.refs =
                u64::try_from(i64::try_from(before).unwrap_or(i64::MAX).saturating_add(delta).max(0)).unwrap_or(0);
            if meta.refs == 0 {
                if before > 0 {
                    batch.remove(&keys::blob(&hash)[..]);
                    batch.insert(&keys::pending_blob(meta.id), &[]);
                    dead.push(meta.id);
                }
            } else {
                batch.insert(&keys::blob(&hash)[..], encode(&meta));
                if before == 0 {
                    batch.remove(&keys::pending_blob(meta.id));
                }
            }
        }
        Ok(())
    }
}

/// Anti-entropy's view of an account (`engine::Replica::digest` / `repair`).
impl Store {
    /// Reconciles the account's mailboxes with its records even if the cache says they match:
    /// true when that changed anything (the local state had drifted).
    pub fn repair_replicated(&self, acct: u32) -> Result<bool> {
        let _guard = self.write.lock().expect("store lock");
        let mut cache = self.replication.accounts.lock().expect("replication cache");
        let mut touched = false;
        let outcome = self.catch_up(&mut cache, acct).and_then(|merged| {
            merged.reconciled = false;
            let effects = self.reconcile_and_apply(sled::Batch::default(), acct, merged)?;
            touched = !effects.touched.is_empty();
            Ok(effects)
        });
        self.finish(&mut cache, acct, outcome)?;
        Ok(touched)
    }
}

#[cfg(test)]
#[path = "replicate_tests.rs"]
mod tests;
