//! The key layout of the `meta` tree. One byte of prefix names the record kind; every integer is
//! big-endian so that sled's lexicographic order is numeric order and prefix scans walk a mailbox
//! by UID, a modseq index by modseq, and a change log by time. The layout is documented in
//! `docs/store.md`; change both together.

pub const ACCOUNT_BY_NAME: u8 = b'A'; // A | address            -> account id (u32)
pub const ACCOUNT: u8 = b'U'; //         U | acct               -> Account
pub const MAILBOX: u8 = b'M'; //         M | acct | mbox        -> Mailbox
pub const MAILBOX_BY_NAME: u8 = b'N'; // N | acct | name        -> mailbox id (u32)
pub const ENTRY: u8 = b'E'; //           E | acct | mbox | uid  -> Entry
pub const MODSEQ: u8 = b'S'; //          S | acct | mbox | modseq | uid -> ()
pub const EXPUNGED: u8 = b'X'; //        X | acct | mbox | modseq | uid -> ()
pub const CHANGE: u8 = b'C'; //          C | acct | hlc | node  -> ChangeRecord
pub const BLOB: u8 = b'B'; //            B | hash(32)           -> BlobMeta
pub const PENDING_BLOB: u8 = b'P'; //    P | blob id            -> () (chunks being written)
pub const GLOBAL: u8 = b'G'; //          G | name               -> node-wide values
pub const QUEUE: u8 = b'Q'; //           Q | queue id           -> QueueEntry
pub const QUEUE_DUE: u8 = b'T'; //       T | due time | queue id -> () (not for held entries)
pub const INDEX: u8 = b'I'; //           I | acct | mbox        -> index snapshot (a cache)
pub const MAILBOX_GUID: u8 = b'K'; //    K | acct | mbox        -> mailbox GUID ([u8; 16])
pub const MAILBOX_BY_GUID: u8 = b'O'; // O | acct | guid(16)    -> mailbox id (u32)
pub const VECTOR: u8 = b'V'; //          V | acct | node        -> hlc (u64): version vector
pub const REPLICATED: u8 = b'R'; //      R | acct | hlc | node  -> sync::merge::Record (replication log)
pub const MSG_ID: u8 = b'J'; //          J | acct | mbox | uid  -> msg id (hlc u64, node u32)
pub const MSG_AT: u8 = b'L'; //          L | acct | hlc | node  -> (mbox u32, uid u32) of a msg id
pub const UNDER_REPLICATED: u8 = b'W'; // W | acct | hlc | node -> () a delivered message no peer acked yet
/// `H | acct | 'v'` -> VersionVector pruned into the base;
/// `H | acct | 's'` -> sync::merge::Snapshot (retention).
pub const BASE: u8 = b'H';

pub const GLOBAL_CLOCK: &[u8] = b"Gclock";

pub fn account_by_name(address: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + address.len());
    k.push(ACCOUNT_BY_NAME);
    k.extend_from_slice(address.as_bytes());
    k
}

pub fn account(acct: u32) -> [u8; 5] {
    let mut k = [ACCOUNT; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}

pub fn mailbox(acct: u32, mbox: u32) -> [u8; 9] {
    let mut k = [MAILBOX; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k
}

pub fn mailbox_prefix(acct: u32) -> [u8; 5] {
    let mut k = [MAILBOX; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}

pub fn mailbox_by_name(acct: u32, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + name.len());
    k.push(MAILBOX_BY_NAME);
    k.extend_from_slice(&acct.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// `K|acct|mbox`: the mailbox's cluster-wide GUID (a separate key: `Mailbox` cannot grow).
pub fn mailbox_guid(acct: u32, mbox: u32) -> [u8; 9] {
    let mut k = [MAILBOX_GUID; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k
}

/// `O|acct|guid`: the local mailbox id of a GUID.
pub fn mailbox_by_guid(acct: u32, guid: &[u8; 16]) -> [u8; 21] {
    let mut k = [MAILBOX_BY_GUID; 21];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..21].copy_from_slice(guid);
    k
}

/// `I|acct|mbox`: the saved mailbox index (`index.rs`).
pub fn index_snapshot(acct: u32, mbox: u32) -> [u8; 9] {
    let mut k = [INDEX; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k
}

/// `E|acct|mbox` — followed by the UID for one entry.
pub fn entry_prefix(acct: u32, mbox: u32) -> [u8; 9] {
    let mut k = [ENTRY; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k
}

pub fn entry(acct: u32, mbox: u32, uid: u32) -> [u8; 13] {
    let mut k = [ENTRY; 13];
    k[1..9].copy_from_slice(&entry_prefix(acct, mbox)[1..]);
    k[9..13].copy_from_slice(&uid.to_be_bytes());
    k
}

/// The UID at the end of an `E` key.
pub fn entry_uid(key: &[u8]) -> u32 {
    u32::from_be_bytes(key[9..13].try_into().expect("E key is 13 bytes"))
}

fn mbox_seq_key(kind: u8, acct: u32, mbox: u32, modseq: u64, uid: u32) -> [u8; 21] {
    let mut k = [kind; 21];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k[9..17].copy_from_slice(&modseq.to_be_bytes());
    k[17..21].copy_from_slice(&uid.to_be_bytes());
    k
}

pub fn modseq(acct: u32, mbox: u32, modseq: u64, uid: u32) -> [u8; 21] {
    mbox_seq_key(MODSEQ, acct, mbox, modseq, uid)
}

pub fn expunged(acct: u32, mbox: u32, modseq: u64, uid: u32) -> [u8; 21] {
    mbox_seq_key(EXPUNGED, acct, mbox, modseq, uid)
}

/// `S|acct|mbox` or `X|acct|mbox`: the index or log of one mailbox.
pub fn mbox_seq_prefix(kind: u8, acct: u32, mbox: u32) -> [u8; 9] {
    let mut k = [kind; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&mbox.to_be_bytes());
    k
}

/// (modseq, uid) at the end of an `S` or `X` key.
pub fn seq_key_parts(key: &[u8]) -> (u64, u32) {
    let modseq = u64::from_be_bytes(key[9..17].try_into().expect("21-byte key"));
    let uid = u32::from_be_bytes(key[17..21].try_into().expect("21-byte key"));
    (modseq, uid)
}

pub fn change(acct: u32, hlc: u64, node: u32) -> [u8; 17] {
    let mut k = [CHANGE; 17];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..13].copy_from_slice(&hlc.to_be_bytes());
    k[13..17].copy_from_slice(&node.to_be_bytes());
    k
}

pub fn change_prefix(acct: u32) -> [u8; 5] {
    let mut k = [CHANGE; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}

/// (hlc, node) at the end of a `C` key.
pub fn change_parts(key: &[u8]) -> (u64, u32) {
    let hlc = u64::from_be_bytes(key[5..13].try_into().expect("17-byte key"));
    let node = u32::from_be_bytes(key[13..17].try_into().expect("17-byte key"));
    (hlc, node)
}

/// `V|acct|node`: the highest HLC of that node's change records held for the account.
pub fn vector(acct: u32, node: u32) -> [u8; 9] {
    let mut k = [VECTOR; 9];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5..9].copy_from_slice(&node.to_be_bytes());
    k
}

pub fn vector_prefix(acct: u32) -> [u8; 5] {
    let mut k = [VECTOR; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}

pub fn blob(hash: &[u8; 32]) -> [u8; 33] {
    let mut k = [BLOB; 33];
    k[1..].copy_from_slice(hash);
    k
}

pub fn pending_blob(id: u64) -> [u8; 9] {
    let mut k = [PENDING_BLOB; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn queue(id: u64) -> [u8; 9] {
    let mut k = [QUEUE; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Due times are seconds since the epoch; negative ones (never written) would sort last.
pub fn queue_due(due: i64, id: u64) -> [u8; 17] {
    let mut k = [QUEUE_DUE; 17];
    k[1..9].copy_from_slice(&(due.max(0) as u64).to_be_bytes());
    k[9..17].copy_from_slice(&id.to_be_bytes());
    k
}

/// (due time, queue id) of a `T` key.
pub fn queue_due_parts(key: &[u8]) -> (i64, u64) {
    let due = u64::from_be_bytes(key[1..9].try_into().expect("17-byte key"));
    let id = u64::from_be_bytes(key[9..17].try_into().expect("17-byte key"));
    (due as i64, id)
}

/// Key of one chunk in the `chunks` tree.
pub fn chunk(blob_id: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&blob_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Smallest key strictly after every key that starts with `prefix`, for exclusive range ends.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// `R|acct|hlc|node`: one record of the replication log, under the id of the change it carries.
pub fn replicated(acct: u32, hlc: u64, node: u32) -> [u8; 17] {
    let mut k = change(acct, hlc, node);
    k[0] = REPLICATED;
    k
}

pub fn replicated_prefix(acct: u32) -> [u8; 5] {
    let mut k = [REPLICATED; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}

/// `H|acct|v`: what retention pruned into the account's base snapshot (its vector alone, read
/// on every push; the snapshot itself is read only when a peer needs it).
pub fn base_vector(acct: u32) -> [u8; 6] {
    base(acct, b'v')
}

/// `H|acct|s`: the account's base snapshot.
pub fn base_snapshot(acct: u32) -> [u8; 6] {
    base(acct, b's')
}

fn base(acct: u32, kind: u8) -> [u8; 6] {
    let mut k = [BASE; 6];
    k[1..5].copy_from_slice(&acct.to_be_bytes());
    k[5] = kind;
    k
}

/// `J|acct|mbox|uid`: the cluster-wide id of the message at a local UID.
pub fn msg_id(acct: u32, mbox: u32, uid: u32) -> [u8; 13] {
    let mut k = entry(acct, mbox, uid);
    k[0] = MSG_ID;
    k
}

/// `L|acct|hlc|node`: where a message (by its id) is shown locally.
pub fn msg_at(acct: u32, hlc: u64, node: u32) -> [u8; 17] {
    let mut k = change(acct, hlc, node);
    k[0] = MSG_AT;
    k
}

/// A msg id as the 12 bytes of a `J` value (big-endian HLC, then node).
pub fn msg_id_value(hlc: u64, node: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&hlc.to_be_bytes());
    v[8..].copy_from_slice(&node.to_be_bytes());
    v
}

pub fn msg_id_parts(value: &[u8]) -> Option<(u64, u32)> {
    let hlc = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let node = u32::from_be_bytes(value.get(8..12)?.try_into().ok()?);
    Some((hlc, node))
}

/// `Gmodseqtag`: the modseq tag IMAP last showed values with (one byte, `Store::adopt_modseq_tag`).
pub const GLOBAL_MODSEQ_TAG: &[u8] = b"Gmodseqtag";

/// `W|acct|hlc|node`: a message (by its id) answered without a peer's durable ack
/// (`sync::durable`), kept until a peer's acknowledged vector covers it.
pub fn under_replicated(acct: u32, hlc: u64, node: u32) -> [u8; 17] {
    let mut k = change(acct, hlc, node);
    k[0] = UNDER_REPLICATED;
    k
}

pub fn under_replicated_prefix(acct: u32) -> [u8; 5] {
    let mut k = [UNDER_REPLICATED; 5];
    k[1..].copy_from_slice(&acct.to_be_bytes());
    k
}
