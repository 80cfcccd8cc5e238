//! Mailbox operations: list, create, rename, delete, subscribe.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{decode, encode, keys, Account, Change, Mailbox, Result, SpecialUse, Store, StoreError, DEFAULT_MAILBOXES};
use crate::sync::merge::Op;

/// A mailbox with its id, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxInfo {
    pub id: u32,
    pub mailbox: Mailbox,
}

/// RFC 3501 §5.1: INBOX is case-insensitive; every other name is kept as given.
pub fn canonical_name(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else if name.len() > 6 && name[..6].eq_ignore_ascii_case("INBOX/") {
        format!("INBOX/{}", &name[6..])
    } else {
        name.to_string()
    }
}

/// The GUID of a default mailbox created at an account's birth: the same on every node, so two
/// nodes that create an account independently (each took mail for it while cut off) create the
/// same mailboxes rather than two INBOXes (`docs/design/replication-plan.md` §2.1).
pub fn default_mailbox_guid(address: &str, name: &str) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(b"postern-default");
    h.update(address.to_lowercase().as_bytes());
    h.update(&[0]);
    h.update(name.as_bytes());
    h.finalize().as_bytes()[..16].try_into().expect("16 of 32 bytes")
}

/// The GUID of any other mailbox: random, so mailboxes created on two nodes never merge by name.
pub fn random_mailbox_guid() -> [u8; 16] {
    rand::random()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && !name.chars().any(|c| c.is_control())
}

impl Store {
    pub(super) fn create_mailbox_in(
        &self,
        batch: &mut sled::Batch,
        acct: u32,
        account: &mut Account,
        name: &str,
        special_use: Option<SpecialUse>,
        guid: [u8; 16],
    ) -> Result<(u32, Mailbox)> {
        let id = account.next_mailbox_id;
        account.next_mailbox_id += 1;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as u32;
        // A fresh UIDVALIDITY for every creation: clients must never match old UIDs to a new mailbox.
        let uidvalidity = now.max(account.last_uidvalidity + 1);
        account.last_uidvalidity = uidvalidity;
        account.modseq += 1;
        let mailbox = Mailbox {
            name: name.to_string(),
            uidvalidity,
            uidnext: 1,
            highest_modseq: account.modseq,
            special_use,
            subscribed: true,
            messages: 0,
            unseen: 0,
            size: 0,
        };
        batch.insert(&keys::mailbox(acct, id), encode(&mailbox));
        batch.insert(keys::mailbox_by_name(acct, name), &id.to_be_bytes());
        batch.insert(&keys::mailbox_guid(acct, id), &guid);
        batch.insert(&keys::mailbox_by_guid(acct, &guid), &id.to_be_bytes());
        let change = Change::MailboxCreate { mailbox: id, name: name.to_string(), uidvalidity, special_use };
        let op = Op::MailboxCreate { guid, name: name.to_string(), uidvalidity, special_use };
        self.log_change(batch, acct, account.modseq, change, Some(op));
        Ok((id, mailbox))
    }

    pub(super) fn load_account(&self, acct: u32) -> Result<Account> {
        self.account(acct)?.ok_or(StoreError::Invalid("no such account"))
    }

    pub fn mailbox(&self, acct: u32, id: u32) -> Result<Option<Mailbox>> {
        self.meta.get(keys::mailbox(acct, id))?.map(|v| decode(&v)).transpose()
    }

    pub fn mailbox_id(&self, acct: u32, name: &str) -> Result<Option<u32>> {
        let name = canonical_name(name);
        match self.meta.get(keys::mailbox_by_name(acct, &name))? {
            Some(v) => {
                Ok(Some(u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Invalid("mailbox id"))?)))
            }
            None => Ok(None),
        }
    }

    /// The mailbox's cluster-wide identity: it survives renames and restarts, unlike the name.
    pub fn mailbox_guid(&self, acct: u32, mbox: u32) -> Result<Option<[u8; 16]>> {
        match self.meta.get(keys::mailbox_guid(acct, mbox))? {
            Some(v) => Ok(Some(v.as_ref().try_into().map_err(|_| StoreError::Invalid("mailbox guid"))?)),
            None => Ok(None),
        }
    }

    /// The local mailbox id for a GUID, if that mailbox exists here.
    pub fn mailbox_by_guid(&self, acct: u32, guid: &[u8; 16]) -> Result<Option<u32>> {
        match self.meta.get(keys::mailbox_by_guid(acct, guid))? {
            Some(v) => {
                Ok(Some(u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Invalid("mailbox id"))?)))
            }
            None => Ok(None),
        }
    }

    /// Gives every mailbox that has none its GUID (a store written before GUIDs existed): the
    /// deterministic one for a default name, else a random one. One batch per account, and only
    /// mailboxes without a `K` key are touched, so an interrupted run resumes where it stopped.
    pub(super) fn migrate_mailbox_guids(&self) -> Result<()> {
        for item in self.meta.scan_prefix([keys::ACCOUNT]) {
            let (k, v) = item?;
            let acct = u32::from_be_bytes(k[1..5].try_into().map_err(|_| StoreError::Invalid("account key"))?);
            let account: Account = decode(&v)?;
            let mut batch = sled::Batch::default();
            let mut any = false;
            for info in self.list_mailboxes(acct)? {
                if self.meta.contains_key(keys::mailbox_guid(acct, info.id))? {
                    continue;
                }
                let name = &info.mailbox.name;
                let mut guid = if DEFAULT_MAILBOXES.iter().any(|(n, _)| n == name) {
                    default_mailbox_guid(&account.address, name)
                } else {
                    random_mailbox_guid()
                };
                if self.meta.contains_key(keys::mailbox_by_guid(acct, &guid))? {
                    guid = random_mailbox_guid();
                }
                batch.insert(&keys::mailbox_guid(acct, info.id), &guid);
                batch.insert(&keys::mailbox_by_guid(acct, &guid), &info.id.to_be_bytes());
                any = true;
            }
            if any {
                self.meta.apply_batch(batch)?;
            }
        }
        Ok(())
    }

    pub fn mailbox_by_name(&self, acct: u32, name: &str) -> Result<Option<MailboxInfo>> {
        match self.mailbox_id(acct, name)? {
            Some(id) => Ok(self.mailbox(acct, id)?.map(|mailbox| MailboxInfo { id, mailbox })),
            None => Ok(None),
        }
    }

    /// Every mailbox of the account, sorted by name.
    pub fn list_mailboxes(&self, acct: u32) -> Result<Vec<MailboxInfo>> {
        let prefix = keys::mailbox_prefix(acct);
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(prefix) {
            let (k, v) = item?;
            let id = u32::from_be_bytes(k[5..9].try_into().map_err(|_| StoreError::Invalid("mailbox key"))?);
            out.push(MailboxInfo { id, mailbox: decode(&v)? });
        }
        out.sort_by(|a, b| a.mailbox.name.cmp(&b.mailbox.name));
        Ok(out)
    }

    pub fn create_mailbox(&self, acct: u32, name: &str, special_use: Option<SpecialUse>) -> Result<u32> {
        let name = canonical_name(name);
        if !valid_name(&name) {
            return Err(StoreError::Invalid("invalid mailbox name"));
        }
        let _guard = self.write.lock().expect("store lock");
        if self.mailbox_id(acct, &name)?.is_some() {
            return Err(StoreError::MailboxExists);
        }
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let guid = random_mailbox_guid();
        let (id, _) = self.create_mailbox_in(&mut batch, acct, &mut account, &name, special_use, guid)?;
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        Ok(id)
    }

    /// Renames a mailbox and its children (`a` → `b` also moves `a/x` → `b/x`). The mailbox keeps
    /// its id, UIDs and UIDVALIDITY. Renaming INBOX is refused here (RFC 3501 §6.3.5 special case
    /// comes with the full IMAP server).
    pub fn rename_mailbox(&self, acct: u32, from: &str, to: &str) -> Result<()> {
        let (from, to) = (canonical_name(from), canonical_name(to));
        if !valid_name(&to) || from == "INBOX" || to.starts_with(&format!("{from}/")) {
            return Err(StoreError::Invalid("invalid mailbox name"));
        }
        let _guard = self.write.lock().expect("store lock");
        if self.mailbox_id(acct, &to)?.is_some() {
            return Err(StoreError::MailboxExists);
        }
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let mut found = false;
        for info in self.list_mailboxes(acct)? {
            let name = &info.mailbox.name;
            let new_name = if *name == from {
                to.clone()
            } else if let Some(rest) = name.strip_prefix(&format!("{from}/")) {
                format!("{to}/{rest}")
            } else {
                continue;
            };
            found |= *name == from;
            account.modseq += 1;
            let mut mailbox = info.mailbox.clone();
            mailbox.name = new_name.clone();
            mailbox.highest_modseq = account.modseq;
            batch.remove(keys::mailbox_by_name(acct, name));
            batch.insert(keys::mailbox_by_name(acct, &new_name), &info.id.to_be_bytes());
            batch.insert(&keys::mailbox(acct, info.id), encode(&mailbox));
            let op = self.known_guid(acct, info.id)?.map(|guid| Op::MailboxRename { guid, to: new_name.clone() });
            let change = Change::MailboxRename { mailbox: info.id, from: name.clone(), to: new_name };
            self.log_change(&mut batch, acct, account.modseq, change, op);
        }
        if !found {
            return Err(StoreError::NoSuchMailbox);
        }
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)
    }

    /// Deletes a mailbox and every entry in it (bodies lose a reference). INBOX cannot be deleted.
    pub fn delete_mailbox(&self, acct: u32, name: &str) -> Result<()> {
        let name = canonical_name(name);
        if name == "INBOX" {
            return Err(StoreError::Invalid("INBOX cannot be deleted"));
        }
        let _guard = self.write.lock().expect("store lock");
        let id = self.mailbox_id(acct, &name)?.ok_or(StoreError::NoSuchMailbox)?;
        let mailbox = self.mailbox(acct, id)?.ok_or(StoreError::NoSuchMailbox)?;
        let mut account = self.load_account(acct)?;
        let mut batch = sled::Batch::default();
        let mut blobs = Vec::new();
        for item in self.meta.scan_prefix(keys::entry_prefix(acct, id)) {
            let (k, v) = item?;
            let entry: super::Entry = decode(&v)?;
            batch.remove(k);
            blobs.push(entry.blob);
        }
        batch.remove(&keys::index_snapshot(acct, id));
        for kind in [keys::MODSEQ, keys::EXPUNGED] {
            for k in self.meta.scan_prefix(keys::mbox_seq_prefix(kind, acct, id)).keys() {
                batch.remove(k?);
            }
        }
        self.remove_mailbox_message_ids(&mut batch, acct, id)?;
        let mut dead = Vec::new();
        self.release_blobs(&mut batch, &blobs, &mut dead)?;
        batch.remove(&keys::mailbox(acct, id));
        batch.remove(keys::mailbox_by_name(acct, &name));
        let guid = self.known_guid(acct, id)?;
        if let Some(guid) = guid {
            batch.remove(&keys::mailbox_guid(acct, id));
            batch.remove(&keys::mailbox_by_guid(acct, &guid));
        }
        account.modseq += 1;
        // What this node has seen: every message it shows in the mailbox was created by a record
        // the vector covers. A message added elsewhere meanwhile keeps the mailbox (add wins).
        let seen = self.vector(acct)?;
        let op = guid.map(|guid| Op::MailboxDelete { guid, seen });
        let change = Change::MailboxDelete { mailbox: id, name, uidvalidity: mailbox.uidvalidity };
        self.log_change(&mut batch, acct, account.modseq, change, op);
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)?;
        self.drop_dead_blobs(&dead)?;
        self.notify(acct, id);
        Ok(())
    }

    pub fn set_subscribed(&self, acct: u32, name: &str, subscribed: bool) -> Result<()> {
        let _guard = self.write.lock().expect("store lock");
        let id = self.mailbox_id(acct, name)?.ok_or(StoreError::NoSuchMailbox)?;
        let mut mailbox = self.mailbox(acct, id)?.ok_or(StoreError::NoSuchMailbox)?;
        if mailbox.subscribed == subscribed {
            return Ok(());
        }
        let mut account = self.load_account(acct)?;
        account.modseq += 1;
        mailbox.subscribed = subscribed;
        let mut batch = sled::Batch::default();
        batch.insert(&keys::mailbox(acct, id), encode(&mailbox));
        let op = self.known_guid(acct, id)?.map(|guid| Op::Subscribe { guid, on: subscribed });
        self.log_change(&mut batch, acct, account.modseq, Change::Subscribe { mailbox: id, subscribed }, op);
        batch.insert(&keys::account(acct), encode(&account));
        self.apply(batch)
    }

    /// Bytes of every message in every mailbox of the account, as quotas count them (RFC 9208
    /// STORAGE): a message filed twice counts twice, though its body is stored once.
    pub fn usage(&self, acct: u32) -> Result<u64> {
        Ok(self.list_mailboxes(acct)?.iter().map(|m| m.mailbox.size).sum())
    }

    /// `usage` by address; 0 for an address that never received mail.
    pub fn usage_of(&self, address: &str) -> Result<u64> {
        match self.account_id(address)? {
            Some(acct) => self.usage(acct),
            None => Ok(0),
        }
    }
}
