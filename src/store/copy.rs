//! IMAP APPEND into an existing mailbox, and COPY/MOVE between mailboxes of one account. A copy
//! references the same body (content-addressed: its `refs` gains one); a move is the copy and the
//! expunge of the sources in one atomic batch, so a crash never leaves both or neither.

use std::collections::HashMap;

use super::message::{add_counts, remove_counts};
use super::replog::append_op;
use super::{encode, keys, BlobMeta, Change, Entry, Mailbox, MessageMeta, PendingBlob, Result, Store, StoreError};
use crate::sync::merge::Op;

impl Store {
    /// Files one body into an existing mailbox (IMAP APPEND): unlike `commit_message`, a missing
    /// mailbox is not created (`NoSuchMailbox`, for `[TRYCREATE]`). Returns (UIDVALIDITY, UID).
    /// The body is discarded on error. The caller acknowledges only after `sync()`.
    pub fn append_message(
        &self,
        acct: u32,
        mbox: u32,
        blob: PendingBlob,
        meta: &MessageMeta<'_>,
    ) -> Result<(u32, u32)> {
        let (uidvalidity, uids) = self.append_messages(acct, mbox, vec![(blob, *meta)])?;
        Ok((uidvalidity, uids[0]))
    }

    /// `append_message` for several bodies in one atomic batch (MULTIAPPEND, RFC 3502): all are
    /// stored or none. Returns the UIDVALIDITY and the new UIDs in order.
    pub fn append_messages(
        &self,
        acct: u32,
        mbox: u32,
        items: Vec<(PendingBlob, MessageMeta<'_>)>,
    ) -> Result<(u32, Vec<u32>)> {
        let guard = self.write.lock().expect("store lock");
        let prepared = self.mailbox(acct, mbox).and_then(|m| {
            let m = m.ok_or(StoreError::NoSuchMailbox)?;
            Ok((m, self.load_account(acct)?))
        });
        let (mut mailbox, mut account) = match prepared {
            Ok(found) => found,
            Err(e) => {
                drop(guard);
                for (blob, _) in items {
                    let _ = self.discard(blob);
                }
                return Err(e);
            }
        };
        let mut batch = sled::Batch::default();
        let guid = self.known_guid(acct, mbox)?;
        // Bodies by hash as they will be after the batch; chunks of duplicates are dropped.
        let mut bodies: HashMap<[u8; 32], BlobMeta> = HashMap::new();
        let mut redundant = Vec::new();
        let mut uids = Vec::with_capacity(items.len());
        for (blob, meta) in items {
            let known = match bodies.get(&blob.hash) {
                Some(m) => Some(*m),
                None => self.blob_meta(&blob.hash)?,
            };
            match known {
                Some(mut existing) if existing.size == blob.size => {
                    existing.refs += 1;
                    bodies.insert(blob.hash, existing);
                }
                _ => {
                    bodies.insert(blob.hash, BlobMeta { id: blob.id, size: blob.size, chunks: blob.chunks, refs: 1 });
                    batch.remove(&keys::pending_blob(blob.id));
                }
            }
            account.modseq += 1;
            let uid = mailbox.uidnext;
            mailbox.uidnext = uid.checked_add(1).ok_or(StoreError::Invalid("UID space exhausted"))?;
            let entry = Entry {
                blob: blob.hash,
                size: blob.size,
                internal_date: meta.internal_date,
                tz_offset_minutes: meta.tz_offset_minutes,
                flags: meta.flags,
                keywords: meta.keywords.to_vec(),
                modseq: account.modseq,
            };
            add_counts(&mut mailbox, &entry);
            batch.insert(&keys::entry(acct, mbox, uid), encode(&entry));
            batch.insert(&keys::modseq(acct, mbox, account.modseq, uid), &[]);
            let op = guid.map(|guid| append_op(guid, uid, &entry));
            let msg =
                self.log_change(&mut batch, acct, account.modseq, Change::Append { mailbox: mbox, uid, entry }, op);
            if guid.is_some() {
                Self::put_message_id(&mut batch, acct, mbox, uid, msg);
            }
            uids.push(uid);
            if bodies.get(&blob.hash).is_some_and(|m| m.id != blob.id) {
                redundant.push(blob);
            }
        }
        for (hash, meta) in &bodies {
            batch.insert(&keys::blob(hash)[..], encode(meta));
        }
        mailbox.highest_modseq = account.modseq;
        batch.insert(&keys::mailbox(acct, mbox), encode(&mailbox));
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        drop(guard);
        for blob in redundant {
            self.discard(blob)?;
        }
        self.notify(acct, mbox);
        Ok((mailbox.uidvalidity, uids))
    }

    /// Copies the given UIDs (those that exist) from one mailbox to another, keeping flags and
    /// internal dates; each copy gets a new UID and modseq and references the same body.
    /// Returns (source UID, new UID) pairs in source order, for COPYUID.
    pub fn copy_messages(&self, acct: u32, from: u32, uids: &[u32], to: u32) -> Result<Vec<(u32, u32)>> {
        self.transfer(acct, from, uids, to, false)
    }

    /// `copy_messages`, and the sources expunged in the same atomic batch (IMAP MOVE).
    pub fn move_messages(&self, acct: u32, from: u32, uids: &[u32], to: u32) -> Result<Vec<(u32, u32)>> {
        self.transfer(acct, from, uids, to, true)
    }

    fn transfer(&self, acct: u32, from: u32, uids: &[u32], to: u32, remove: bool) -> Result<Vec<(u32, u32)>> {
        let guard = self.write.lock().expect("store lock");
        let mut boxes: HashMap<u32, Mailbox> = HashMap::new();
        boxes.insert(from, self.mailbox(acct, from)?.ok_or(StoreError::NoSuchMailbox)?);
        if to != from {
            boxes.insert(to, self.mailbox(acct, to)?.ok_or(StoreError::NoSuchMailbox)?);
        }
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let target = self.known_guid(acct, to)?;
        let mut pairs = Vec::new();
        let mut sources = Vec::new();
        let mut added: HashMap<[u8; 32], u64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for &uid in uids {
            if !seen.insert(uid) {
                continue;
            }
            let Some(entry) = self.entry(acct, from, uid)? else { continue };
            account.modseq += 1;
            let dst = boxes.get_mut(&to).expect("loaded above");
            let new_uid = dst.uidnext;
            dst.uidnext = new_uid.checked_add(1).ok_or(StoreError::Invalid("UID space exhausted"))?;
            let copy = Entry { modseq: account.modseq, ..entry.clone() };
            add_counts(dst, &copy);
            dst.highest_modseq = account.modseq;
            batch.insert(&keys::entry(acct, to, new_uid), encode(&copy));
            batch.insert(&keys::modseq(acct, to, account.modseq, new_uid), &[]);
            if !remove {
                *added.entry(copy.blob).or_default() += 1;
            }
            // A copy is a new message: an `Append` whose id is the copy's msg id. A move is
            // these appends plus one `Expunge` of the sources, as the `C` log has it (one record
            // per copy, one for the sources), rather than `Op::Move` per message: the merged
            // state is the same, and `R` stays one record per `C` record with the same id.
            let op = target.map(|guid| append_op(guid, new_uid, &copy));
            let change = Change::Append { mailbox: to, uid: new_uid, entry: copy };
            let msg = self.log_change(&mut batch, acct, account.modseq, change, op);
            if target.is_some() {
                Self::put_message_id(&mut batch, acct, to, new_uid, msg);
            }
            pairs.push((uid, new_uid));
            sources.push((uid, entry));
        }
        if pairs.is_empty() {
            return Ok(pairs);
        }
        if remove {
            // The body keeps its reference count: one entry goes, one comes.
            let src = boxes.get_mut(&from).expect("loaded above");
            let mut removed = Vec::with_capacity(sources.len());
            let mut msgs = Vec::with_capacity(sources.len());
            for (uid, entry) in &sources {
                let msg = self.known_message_id(acct, from, *uid)?;
                Self::remove_message_id(&mut batch, acct, from, *uid, msg);
                msgs.extend(msg);
                account.modseq += 1;
                remove_counts(src, entry);
                batch.remove(&keys::entry(acct, from, *uid));
                batch.remove(&keys::modseq(acct, from, entry.modseq, *uid));
                batch.insert(&keys::expunged(acct, from, account.modseq, *uid), &[]);
                removed.push(*uid);
            }
            src.highest_modseq = account.modseq;
            let change = Change::Expunge { mailbox: from, uids: removed };
            self.log_change(&mut batch, acct, account.modseq, change, Some(Op::Expunge { msgs }));
        } else {
            for (hash, n) in added {
                let mut meta = self.blob_meta(&hash)?.ok_or(StoreError::Invalid("entry without body"))?;
                meta.refs += n;
                batch.insert(&keys::blob(&hash)[..], encode(&meta));
            }
        }
        for (id, mailbox) in &boxes {
            batch.insert(&keys::mailbox(acct, *id), encode(mailbox));
        }
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        drop(guard);
        for id in boxes.keys() {
            self.notify(acct, *id);
        }
        Ok(pairs)
    }
}
