//! The replication log's write side (issue 8): every local change that logs a `C` record also
//! logs, under the same `ChangeId`, an `R` record carrying the change as a `sync::merge::Op`, in
//! cluster-wide terms (mailbox GUIDs, message ids) rather than local mailbox ids and UIDs. Peers
//! merge `R` records; the `C` log stays the local history (IMAP's modseqs).
//!
//! A message's id is the id of the record that created it here (`Append`); `J|acct|mbox|uid`
//! maps a local UID to it and `L|acct|hlc|node` maps it back, both written with the entry and
//! removed with it. Layout and migration: `docs/store.md`.

use std::collections::BTreeSet;

use super::{decode, encode, keys, ChangeId, Entry, Flags, Result, Store, StoreError};
use crate::sync::merge::{self, Body, FlagKey, MsgId, Op};

/// `Greplog|acct`: present once the account's `R` log describes all of its state, written at the
/// account's birth or by the migration at open. Without it, open writes the synthetic records.
pub(super) fn migrated_marker(acct: u32) -> Vec<u8> {
    let mut k = b"Greplog".to_vec();
    k.extend_from_slice(&acct.to_be_bytes());
    k
}

/// What a message is, as an `Append` carries it.
pub(super) fn body_of(entry: &Entry) -> Body {
    Body {
        blob: entry.blob,
        size: entry.size,
        internal_date: entry.internal_date,
        tz_offset_minutes: entry.tz_offset_minutes,
    }
}

/// An `Append` of an entry as it is now, claiming its local UID.
pub(super) fn append_op(guid: [u8; 16], uid: u32, entry: &Entry) -> Op {
    Op::Append { guid, uid: Some(uid), body: body_of(entry), flags: entry.flags, keywords: entry.keywords.clone() }
}

/// The flag registers a STORE changed: (set, clear), one key per system flag bit and per keyword.
/// Only the difference goes out, so a concurrent change of another flag on another node survives
/// (a replace would otherwise clear it). Keywords compare exactly: the store keeps the spelling a
/// client gave, and the merged view must keep the same strings.
pub(super) fn flag_diff(old: (Flags, &[String]), new: (Flags, &[String])) -> (Vec<FlagKey>, Vec<FlagKey>) {
    let (mut set, mut clear) = (Vec::new(), Vec::new());
    for (flag, _) in Flags::ALL {
        match (old.0.contains(flag), new.0.contains(flag)) {
            (false, true) => set.push(FlagKey::System(flag.0)),
            (true, false) => clear.push(FlagKey::System(flag.0)),
            _ => {}
        }
    }
    let before: BTreeSet<&String> = old.1.iter().collect();
    let after: BTreeSet<&String> = new.1.iter().collect();
    set.extend(after.difference(&before).map(|k| FlagKey::Keyword((*k).clone())));
    clear.extend(before.difference(&after).map(|k| FlagKey::Keyword((*k).clone())));
    (set, clear)
}

/// `msg_at` value: the local mailbox and UID of a message id.
fn msg_at_value(mbox: u32, uid: u32) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&mbox.to_be_bytes());
    v[4..].copy_from_slice(&uid.to_be_bytes());
    v
}

/// `J|acct|mbox` — the message ids of one mailbox.
fn msg_id_prefix(acct: u32, mbox: u32) -> [u8; 9] {
    keys::msg_id(acct, mbox, 0)[..9].try_into().expect("9 of 13 bytes")
}

impl Store {
    /// Adds the `R` record of a change to `batch`, under the `C` record's id.
    pub(super) fn log_replicated(&self, batch: &mut sled::Batch, acct: u32, id: ChangeId, op: Op) {
        batch.insert(&keys::replicated(acct, id.hlc, id.node), encode(&merge::Record { id, op }));
    }

    /// The cluster-wide id of the message at a local UID (`None`: no such message, or one an
    /// older build wrote and the migration has not numbered).
    pub fn message_id(&self, acct: u32, mbox: u32, uid: u32) -> Result<Option<MsgId>> {
        let Some(v) = self.meta.get(keys::msg_id(acct, mbox, uid))? else { return Ok(None) };
        let (hlc, node) = keys::msg_id_parts(&v).ok_or(StoreError::Invalid("msg id"))?;
        Ok(Some(ChangeId { hlc, node }))
    }

    /// Where a message id is shown here: (mailbox, UID).
    pub fn message_at(&self, acct: u32, msg: MsgId) -> Result<Option<(u32, u32)>> {
        let Some(v) = self.meta.get(keys::msg_at(acct, msg.hlc, msg.node))? else { return Ok(None) };
        let mbox = v.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        let uid = v.get(4..8).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        match (mbox, uid) {
            (Some(mbox), Some(uid)) => Ok(Some((mbox, uid))),
            _ => Err(StoreError::Invalid("msg at")),
        }
    }

    /// The message id of an entry a write is about to change or remove; a missing one (an older
    /// build's entry the migration did not reach) is logged, and the caller leaves that message
    /// out of the `R` record rather than fail the client's command.
    pub(super) fn known_message_id(&self, acct: u32, mbox: u32, uid: u32) -> Result<Option<MsgId>> {
        let id = self.message_id(acct, mbox, uid)?;
        if id.is_none() {
            tracing::warn!("store message without id account={acct} mailbox={mbox} uid={uid}: not replicated");
        }
        Ok(id)
    }

    /// The GUID a write names a mailbox by; a missing one is logged like a missing message id.
    pub(super) fn known_guid(&self, acct: u32, mbox: u32) -> Result<Option<[u8; 16]>> {
        let guid = self.mailbox_guid(acct, mbox)?;
        if guid.is_none() {
            tracing::warn!("store mailbox without GUID account={acct} mailbox={mbox}: not replicated");
        }
        Ok(guid)
    }

    /// `J` and `L` for a message placed at (mbox, uid).
    pub(super) fn put_message_id(batch: &mut sled::Batch, acct: u32, mbox: u32, uid: u32, msg: MsgId) {
        batch.insert(&keys::msg_id(acct, mbox, uid), &keys::msg_id_value(msg.hlc, msg.node));
        batch.insert(&keys::msg_at(acct, msg.hlc, msg.node), &msg_at_value(mbox, uid));
    }

    /// Removes `J` and `L` of a message leaving (mbox, uid).
    pub(super) fn remove_message_id(batch: &mut sled::Batch, acct: u32, mbox: u32, uid: u32, msg: Option<MsgId>) {
        batch.remove(&keys::msg_id(acct, mbox, uid));
        if let Some(msg) = msg {
            batch.remove(&keys::msg_at(acct, msg.hlc, msg.node));
        }
    }

    /// Removes every `J` and `L` key of a mailbox being deleted.
    pub(super) fn remove_mailbox_message_ids(&self, batch: &mut sled::Batch, acct: u32, mbox: u32) -> Result<()> {
        for item in self.meta.scan_prefix(msg_id_prefix(acct, mbox)) {
            let (k, v) = item?;
            if let Some((hlc, node)) = keys::msg_id_parts(&v) {
                batch.remove(&keys::msg_at(acct, hlc, node));
            }
            batch.remove(k);
        }
        Ok(())
    }

    /// The account's replication log in (hlc, node) order.
    pub fn replicated_records(&self, acct: u32) -> Result<Vec<merge::Record>> {
        self.meta.scan_prefix(keys::replicated_prefix(acct)).values().map(|v| decode(&v?)).collect()
    }

    /// Gives the `R` log of an account written before it existed its content: for an account
    /// without the marker, when its `R` log is empty, one `MailboxCreate` per mailbox (and a
    /// `Subscribe` off for an unsubscribed one), then one `Append` per entry without a message
    /// id (with its current flags, claiming its UID), with `J`/`L` keys and `V` advanced. Each
    /// record takes a fresh id from the clock, as if the node had just made the change. One batch
    /// per account, marker included, so an interrupted run redoes only unfinished accounts.
    pub(super) fn migrate_replication_log(&self) -> Result<()> {
        let accounts: Vec<_> = self.meta.scan_prefix([keys::ACCOUNT]).keys().collect::<sled::Result<_>>()?;
        for k in accounts {
            let acct = u32::from_be_bytes(k[1..5].try_into().map_err(|_| StoreError::Invalid("account key"))?);
            let marker = migrated_marker(acct);
            if self.meta.contains_key(&marker)? {
                continue;
            }
            let empty = self.meta.scan_prefix(keys::replicated_prefix(acct)).next().is_none();
            let mut batch = sled::Batch::default();
            let mut last = None;
            let mut next_id = || {
                let id = ChangeId { hlc: self.clock.tick(), node: self.node };
                last = Some(id);
                id
            };
            let mailboxes = self.list_mailboxes(acct)?;
            let mut records = 0usize;
            for info in &mailboxes {
                let Some(guid) = self.known_guid(acct, info.id)? else { continue };
                let m = &info.mailbox;
                if empty {
                    let op = Op::MailboxCreate {
                        guid,
                        name: m.name.clone(),
                        uidvalidity: m.uidvalidity,
                        special_use: m.special_use,
                    };
                    self.log_replicated(&mut batch, acct, next_id(), op);
                    records += 1;
                    if !m.subscribed {
                        self.log_replicated(&mut batch, acct, next_id(), Op::Subscribe { guid, on: false });
                        records += 1;
                    }
                }
                for (uid, entry) in self.entries(acct, info.id)? {
                    if self.meta.contains_key(keys::msg_id(acct, info.id, uid))? {
                        continue;
                    }
                    let id = next_id();
                    self.log_replicated(&mut batch, acct, id, append_op(guid, uid, &entry));
                    Self::put_message_id(&mut batch, acct, info.id, uid, id);
                    records += 1;
                }
            }
            if let Some(last) = last {
                let hlc = last.hlc.max(self.vector(acct)?.get(last.node));
                batch.insert(&keys::vector(acct, last.node), &hlc.to_be_bytes());
            }
            batch.insert(marker, &[]);
            self.apply(batch)?;
            if records > 0 {
                tracing::info!("store replication log migrated account={acct} records={records}");
            }
        }
        Ok(())
    }
}
