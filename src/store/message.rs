//! Message entries: commit a body into mailboxes, read entries, change flags, expunge.

use std::collections::HashMap;

use super::queue::NewQueued;
use super::replog::{append_op, flag_diff};
use super::{
    decode, encode, keys, Account, BlobMeta, Change, Entry, Flags, Mailbox, PendingBlob, Result, Store, StoreError,
    DEFAULT_MAILBOXES,
};
use crate::sync::merge::Op;

/// Where one copy of a message goes.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryTarget<'a> {
    pub address: &'a str,
    pub mailbox: &'a str,
    /// Stored with \Seen on top of the message's flags (the sender's own copy in Sent).
    pub seen: bool,
}

impl<'a> DeliveryTarget<'a> {
    pub fn inbox(address: &'a str) -> Self {
        DeliveryTarget { address, mailbox: "INBOX", seen: false }
    }
}

/// What a new message carries besides its body, the same for every copy.
#[derive(Debug, Clone, Copy)]
pub struct MessageMeta<'a> {
    pub flags: Flags,
    pub keywords: &'a [String],
    pub internal_date: i64,
    pub tz_offset_minutes: i16,
}

/// Where one copy landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub address: String,
    pub account: u32,
    pub mailbox: u32,
    pub uid: u32,
    pub uidvalidity: u32,
}

/// What a conditional STORE did: the entries it changed, and the UIDs it left alone because
/// they had changed since the given modseq.
pub type ConditionalStore = (Vec<(u32, Entry)>, Vec<u32>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    Replace,
    Add,
    Remove,
}

/// One mailbox being changed within a batch, written back once at the end.
struct Open {
    acct: u32,
    id: u32,
    mailbox: Mailbox,
}

impl Store {
    /// Files one body into every target mailbox in one atomic batch and returns the UIDs. The
    /// caller acknowledges only after `sync()`. A body already stored (same hash) is not stored
    /// again: the new chunks are dropped and the old body gains references.
    pub fn commit_message(
        &self,
        blob: PendingBlob,
        targets: &[DeliveryTarget<'_>],
        flags: Flags,
        keywords: &[String],
        internal_date: i64,
        tz_offset_minutes: i16,
    ) -> Result<Vec<Stored>> {
        let meta = MessageMeta { flags, keywords, internal_date, tz_offset_minutes };
        Ok(self.commit_with_queue(blob, targets, &meta, None)?.0)
    }

    /// `commit_message` that also puts the body in the outbound queue, in the same atomic batch,
    /// so a message with local and remote recipients is either stored for all of them or for
    /// none. Returns the queue id when `queued` was given.
    pub fn commit_with_queue(
        &self,
        blob: PendingBlob,
        targets: &[DeliveryTarget<'_>],
        meta: &MessageMeta<'_>,
        queued: Option<NewQueued>,
    ) -> Result<(Vec<Stored>, Option<u64>)> {
        let MessageMeta { flags, keywords, internal_date, tz_offset_minutes } = *meta;
        let mut resolved = Vec::with_capacity(targets.len());
        for t in targets {
            let acct = self.ensure_account(t.address)?;
            let mailbox = super::mailbox::canonical_name(t.mailbox);
            if !resolved.iter().any(|(a, m, _, _): &(u32, String, &str, bool)| *a == acct && *m == mailbox) {
                resolved.push((acct, mailbox, t.address, t.seen));
            }
        }
        if resolved.is_empty() && queued.is_none() {
            self.discard(blob)?;
            return Ok((Vec::new(), None));
        }
        let queued = match queued {
            Some(q) if q.recipients.is_empty() => return Err(StoreError::Invalid("queue entry without recipients")),
            Some(q) => Some(super::queue::QueueEntry::new(self.db.generate_id()?, q, &blob)),
            None => None,
        };
        let _guard = self.write.lock().expect("store lock");
        let mut batch = sled::Batch::default();
        let existing = self.blob_meta(&blob.hash)?;
        let n = resolved.len() as u64 + u64::from(queued.is_some());
        let drop_new_chunks = match existing {
            Some(mut meta) if meta.size == blob.size => {
                meta.refs += n;
                batch.insert(&keys::blob(&blob.hash)[..], encode(&meta));
                true
            }
            _ => {
                let meta = BlobMeta { id: blob.id, size: blob.size, chunks: blob.chunks, refs: n };
                batch.insert(&keys::blob(&blob.hash)[..], encode(&meta));
                batch.remove(&keys::pending_blob(blob.id));
                false
            }
        };
        let mut accounts: HashMap<u32, Account> = HashMap::new();
        let mut stored = Vec::with_capacity(resolved.len());
        let mut touched = Vec::new();
        for (acct, name, address, seen) in resolved {
            if let std::collections::hash_map::Entry::Vacant(e) = accounts.entry(acct) {
                e.insert(self.load_account(acct)?);
            }
            let account = accounts.get_mut(&acct).expect("inserted above");
            let existing = match self.mailbox_id(acct, &name)? {
                Some(id) => self.mailbox(acct, id)?.map(|m| (id, m)),
                None => None,
            };
            let (id, mailbox, guid) = match existing {
                Some((id, mailbox)) => (id, mailbox, self.known_guid(acct, id)?),
                None => {
                    let special = DEFAULT_MAILBOXES.iter().find(|(n, _)| *n == name).and_then(|(_, s)| *s);
                    // A default name recreated after a delete is a new mailbox: a random GUID.
                    let guid = super::mailbox::random_mailbox_guid();
                    let (id, mailbox) = self.create_mailbox_in(&mut batch, acct, account, &name, special, guid)?;
                    (id, mailbox, Some(guid))
                }
            };
            let mut open = Open { acct, id, mailbox };
            account.modseq += 1;
            let uid = open.mailbox.uidnext;
            open.mailbox.uidnext = uid.checked_add(1).ok_or(StoreError::Invalid("UID space exhausted"))?;
            let entry = Entry {
                blob: blob.hash,
                size: blob.size,
                internal_date,
                tz_offset_minutes,
                flags: if seen { Flags(flags.0 | Flags::SEEN.0) } else { flags },
                keywords: keywords.to_vec(),
                modseq: account.modseq,
            };
            add_counts(&mut open.mailbox, &entry);
            open.mailbox.highest_modseq = account.modseq;
            batch.insert(&keys::entry(acct, id, uid), encode(&entry));
            batch.insert(&keys::modseq(acct, id, account.modseq, uid), &[]);
            let op = guid.map(|guid| append_op(guid, uid, &entry));
            let replicated = op.is_some();
            let msg = self.log_change(&mut batch, acct, account.modseq, Change::Append { mailbox: id, uid, entry }, op);
            if replicated {
                Self::put_message_id(&mut batch, acct, id, uid, msg);
            }
            batch.insert(&keys::mailbox(acct, id), encode(&open.mailbox));
            stored.push(Stored {
                address: address.to_string(),
                account: acct,
                mailbox: id,
                uid,
                uidvalidity: open.mailbox.uidvalidity,
            });
            touched.push((open.acct, open.id));
        }
        for (acct, account) in &accounts {
            batch.insert(&keys::account(*acct), encode(account));
        }
        let queue_id = queued.map(|entry| {
            super::queue::insert(&mut batch, &entry);
            entry.id
        });
        self.apply(batch)?;
        drop(_guard);
        if drop_new_chunks {
            self.discard(blob)?;
        }
        for (acct, id) in touched {
            self.notify(acct, id);
        }
        Ok((stored, queue_id))
    }

    /// Removes a written body that will not be committed.
    pub fn discard(&self, blob: PendingBlob) -> Result<()> {
        self.remove_chunks(blob.id)?;
        self.meta.remove(keys::pending_blob(blob.id))?;
        Ok(())
    }

    pub fn entry(&self, acct: u32, mbox: u32, uid: u32) -> Result<Option<Entry>> {
        self.meta.get(keys::entry(acct, mbox, uid))?.map(|v| decode(&v)).transpose()
    }

    /// Every entry of a mailbox in UID order.
    pub fn entries(&self, acct: u32, mbox: u32) -> Result<Vec<(u32, Entry)>> {
        self.meta
            .scan_prefix(keys::entry_prefix(acct, mbox))
            .map(|item| {
                let (k, v) = item?;
                Ok((keys::entry_uid(&k), decode(&v)?))
            })
            .collect()
    }

    /// The UIDs of a mailbox in order (from the mailbox index; empty when there is no mailbox).
    pub fn uids(&self, acct: u32, mbox: u32) -> Result<Vec<u32>> {
        Ok(self.with_view(acct, mbox, |v| v.uids())?.unwrap_or_default())
    }

    /// Changes flags of the given UIDs; returns the entries that changed (with their new modseq).
    pub fn store_flags(
        &self,
        acct: u32,
        mbox: u32,
        uids: &[u32],
        op: FlagOp,
        flags: Flags,
        keywords: &[String],
    ) -> Result<Vec<(u32, Entry)>> {
        Ok(self.store_flags_unchanged_since(acct, mbox, uids, op, flags, keywords, None)?.0)
    }

    /// `store_flags` for CONDSTORE's STORE UNCHANGEDSINCE (RFC 7162 §3.1.3): with
    /// `Some(n)`, entries whose modseq is above n are left alone and returned second. The test
    /// and the change happen under the one write lock, so no other change slips in between.
    #[allow(clippy::too_many_arguments)]
    pub fn store_flags_unchanged_since(
        &self,
        acct: u32,
        mbox: u32,
        uids: &[u32],
        op: FlagOp,
        flags: Flags,
        keywords: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<ConditionalStore> {
        let mut modified = Vec::new();
        let _guard = self.write.lock().expect("store lock");
        let mut mailbox = self.mailbox(acct, mbox)?.ok_or(StoreError::NoSuchMailbox)?;
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let mut changed = Vec::new();
        // A UID named twice is changed once: entries are read from sled, not from the batch, so
        // a repeat would count the old entry out of the mailbox's counters twice.
        let mut once = std::collections::HashSet::new();
        for &uid in uids {
            if !once.insert(uid) {
                continue;
            }
            let Some(mut entry) = self.entry(acct, mbox, uid)? else { continue };
            if unchanged_since.is_some_and(|n| entry.modseq > n) {
                modified.push(uid);
                continue;
            }
            let (new_flags, new_keywords) = apply_flags(&entry, op, flags, keywords);
            if new_flags == entry.flags && new_keywords == entry.keywords {
                continue;
            }
            let (set, clear) = flag_diff((entry.flags, &entry.keywords), (new_flags, &new_keywords));
            let replicated = self.known_message_id(acct, mbox, uid)?.map(|msg| Op::SetFlags { msg, set, clear });
            remove_counts(&mut mailbox, &entry);
            batch.remove(&keys::modseq(acct, mbox, entry.modseq, uid));
            account.modseq += 1;
            entry.flags = new_flags;
            entry.keywords = new_keywords;
            entry.modseq = account.modseq;
            add_counts(&mut mailbox, &entry);
            batch.insert(&keys::entry(acct, mbox, uid), encode(&entry));
            batch.insert(&keys::modseq(acct, mbox, entry.modseq, uid), &[]);
            let change = Change::Flags { mailbox: mbox, uid, flags: entry.flags, keywords: entry.keywords.clone() };
            self.log_change(&mut batch, acct, account.modseq, change, replicated);
            changed.push((uid, entry));
        }
        if changed.is_empty() {
            return Ok((changed, modified));
        }
        mailbox.highest_modseq = account.modseq;
        batch.insert(&keys::mailbox(acct, mbox), encode(&mailbox));
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        drop(_guard);
        self.notify(acct, mbox);
        Ok((changed, modified))
    }

    /// Removes the given UIDs from a mailbox; returns the UIDs that were removed. Each removal is
    /// logged with its modseq (for QRESYNC's VANISHED) and releases the body's reference.
    pub fn expunge(&self, acct: u32, mbox: u32, uids: &[u32]) -> Result<Vec<u32>> {
        let _guard = self.write.lock().expect("store lock");
        let mut mailbox = self.mailbox(acct, mbox)?.ok_or(StoreError::NoSuchMailbox)?;
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let mut removed = Vec::new();
        let mut blobs = Vec::new();
        let mut msgs = Vec::new();
        // A UID named twice is removed once (a repeat would release its body twice).
        let mut once = std::collections::HashSet::new();
        for &uid in uids {
            if !once.insert(uid) {
                continue;
            }
            let Some(entry) = self.entry(acct, mbox, uid)? else { continue };
            let msg = self.known_message_id(acct, mbox, uid)?;
            Self::remove_message_id(&mut batch, acct, mbox, uid, msg);
            msgs.extend(msg);
            account.modseq += 1;
            remove_counts(&mut mailbox, &entry);
            batch.remove(&keys::entry(acct, mbox, uid));
            batch.remove(&keys::modseq(acct, mbox, entry.modseq, uid));
            batch.insert(&keys::expunged(acct, mbox, account.modseq, uid), &[]);
            blobs.push(entry.blob);
            removed.push(uid);
        }
        if removed.is_empty() {
            return Ok(removed);
        }
        let mut dead = Vec::new();
        self.release_blobs(&mut batch, &blobs, &mut dead)?;
        mailbox.highest_modseq = account.modseq;
        let change = Change::Expunge { mailbox: mbox, uids: removed.clone() };
        self.log_change(&mut batch, acct, account.modseq, change, Some(Op::Expunge { msgs }));
        batch.insert(&keys::mailbox(acct, mbox), encode(&mailbox));
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        drop(_guard);
        self.drop_dead_blobs(&dead)?;
        self.notify(acct, mbox);
        Ok(removed)
    }

    /// Decrements body references in `batch`; bodies that reach zero are removed from the index
    /// and marked pending, so their chunks go now or, after a crash, at the next start.
    pub(super) fn release_blobs(
        &self,
        batch: &mut sled::Batch,
        hashes: &[[u8; 32]],
        dead: &mut Vec<u64>,
    ) -> Result<()> {
        let mut counts: HashMap<[u8; 32], u64> = HashMap::new();
        for h in hashes {
            *counts.entry(*h).or_default() += 1;
        }
        for (hash, n) in counts {
            let Some(mut meta) = self.blob_meta(&hash)? else { continue };
            meta.refs = meta.refs.saturating_sub(n);
            if meta.refs == 0 {
                batch.remove(&keys::blob(&hash)[..]);
                batch.insert(&keys::pending_blob(meta.id), &[]);
                dead.push(meta.id);
            } else {
                batch.insert(&keys::blob(&hash)[..], encode(&meta));
            }
        }
        Ok(())
    }

    pub(super) fn drop_dead_blobs(&self, dead: &[u64]) -> Result<()> {
        for &id in dead {
            self.remove_chunks(id)?;
            self.meta.remove(keys::pending_blob(id))?;
        }
        Ok(())
    }

    /// UIDs whose entries changed after `modseq` (CONDSTORE's CHANGEDSINCE), from the index.
    pub fn changed_since(&self, acct: u32, mbox: u32, modseq: u64) -> Result<Vec<u32>> {
        let prefix = keys::mbox_seq_prefix(keys::MODSEQ, acct, mbox);
        let mut start = prefix.to_vec();
        start.extend_from_slice(&(modseq + 1).to_be_bytes());
        let mut uids: Vec<u32> = self
            .meta
            .range(start..keys::prefix_end(&prefix))
            .keys()
            .map(|k| k.map(|k| keys::seq_key_parts(&k).1))
            .collect::<sled::Result<_>>()?;
        uids.sort_unstable();
        Ok(uids)
    }

    /// UIDs expunged after `modseq` (QRESYNC's VANISHED), from the log.
    pub fn expunged_since(&self, acct: u32, mbox: u32, modseq: u64) -> Result<Vec<u32>> {
        let prefix = keys::mbox_seq_prefix(keys::EXPUNGED, acct, mbox);
        let mut start = prefix.to_vec();
        start.extend_from_slice(&(modseq + 1).to_be_bytes());
        let mut uids: Vec<u32> = self
            .meta
            .range(start..keys::prefix_end(&prefix))
            .keys()
            .map(|k| k.map(|k| keys::seq_key_parts(&k).1))
            .collect::<sled::Result<_>>()?;
        uids.sort_unstable();
        Ok(uids)
    }
}

pub(super) fn add_counts(mailbox: &mut Mailbox, entry: &Entry) {
    mailbox.messages += 1;
    mailbox.size += entry.size;
    if !entry.flags.contains(Flags::SEEN) {
        mailbox.unseen += 1;
    }
}

pub(super) fn remove_counts(mailbox: &mut Mailbox, entry: &Entry) {
    mailbox.messages = mailbox.messages.saturating_sub(1);
    mailbox.size = mailbox.size.saturating_sub(entry.size);
    if !entry.flags.contains(Flags::SEEN) {
        mailbox.unseen = mailbox.unseen.saturating_sub(1);
    }
}

fn apply_flags(entry: &Entry, op: FlagOp, flags: Flags, keywords: &[String]) -> (Flags, Vec<String>) {
    let mut kw = entry.keywords.clone();
    let f = match op {
        FlagOp::Replace => {
            kw = Vec::new();
            for k in keywords {
                if !kw.iter().any(|x: &String| x.eq_ignore_ascii_case(k)) {
                    kw.push(k.clone());
                }
            }
            flags
        }
        FlagOp::Add => {
            for k in keywords {
                if !kw.iter().any(|x| x.eq_ignore_ascii_case(k)) {
                    kw.push(k.clone());
                }
            }
            entry.flags.union(flags)
        }
        FlagOp::Remove => {
            kw.retain(|x| !keywords.iter().any(|k| k.eq_ignore_ascii_case(x)));
            entry.flags.minus(flags)
        }
    };
    (f, kw)
}
