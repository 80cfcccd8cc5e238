//! The reference semantics of replicated mailbox state (issue 8; `docs/design/replication-plan.md`
//! §2.4 and §2.6).
//!
//! An account's replicated state is a function of the *set* of change records the node has
//! applied, never of the order they arrived in: that is what makes every node converge, and what
//! makes a duplicated batch harmless. This module states that function as a state-based CRDT:
//! every piece of state is a register that keeps the value with the greatest [`ChangeId`], or a
//! grow-only set. `apply` is therefore commutative, associative and idempotent by construction,
//! and the tests check it anyway over random multi-node histories.
//!
//! It holds no I/O and is deliberately simple (whole maps in memory). The sled store's
//! incremental apply and the simulation's in-memory replica are checked against it: both must
//! produce the same [`View`] from the same record set. The node-local parts of IMAP state
//! (UIDNEXT, MODSEQ, which UIDs a client has been shown) are not here; they are projections kept
//! by each node (`Projection`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::{ChangeId, Flags, SpecialUse, VersionVector};

/// A mailbox's cluster-wide identity; the local `mbox` number differs per node.
pub type Guid = [u8; 16];

/// A message's cluster-wide identity: the id of the record that put it in its mailbox (an
/// `Append`, or the `Move` that created the moved copy). A copy is a new message.
pub type MsgId = ChangeId;

/// One flag register's key: a system flag (one bit of [`Flags`]) or a keyword.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FlagKey {
    System(u8),
    Keyword(String),
}

/// What a message is, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    pub blob: [u8; 32],
    pub size: u64,
    pub internal_date: i64,
    pub tz_offset_minutes: i16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    MailboxCreate {
        guid: Guid,
        name: String,
        uidvalidity: u32,
        special_use: Option<SpecialUse>,
    },
    MailboxRename {
        guid: Guid,
        to: String,
    },
    /// Removes the messages whose creation `seen` covers. The mailbox itself survives, with the
    /// others, when it holds any it had not seen (plan §2.6, "add wins").
    MailboxDelete {
        guid: Guid,
        seen: VersionVector,
    },
    Subscribe {
        guid: Guid,
        on: bool,
    },
    SpecialUse {
        guid: Guid,
        value: Option<SpecialUse>,
    },
    /// A delivery, APPEND, or COPY target. `uid` is a claim: `None` on a node that waits for the
    /// allocator (plan §2.4 rule 2).
    Append {
        guid: Guid,
        uid: Option<u32>,
        body: Body,
        flags: Flags,
        keywords: Vec<String>,
    },
    /// Only the flags that changed: STORE FLAGS (replace) becomes set/clear of the difference,
    /// so a concurrent change of another flag survives.
    SetFlags {
        msg: MsgId,
        set: Vec<FlagKey>,
        clear: Vec<FlagKey>,
    },
    Expunge {
        msgs: Vec<MsgId>,
    },
    /// Self-contained: the moved copy (this record's id) is added to `to`, `src` is expunged.
    Move {
        src: MsgId,
        to: Guid,
        uid: Option<u32>,
        body: Body,
        flags: Flags,
        keywords: Vec<String>,
    },
    /// The allocator's UID decisions (plan §2.4 rule 5).
    UidAssign {
        assignments: Vec<(MsgId, u32)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: ChangeId,
    pub op: Op,
}

/// A last-writer-wins register: the value written by the greatest change id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reg<T> {
    id: ChangeId,
    value: T,
}

fn write<T>(slot: &mut Option<Reg<T>>, id: ChangeId, value: T) {
    if slot.as_ref().is_none_or(|r| r.id < id) {
        *slot = Some(Reg { id, value });
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MailboxRegs {
    /// The greatest UIDVALIDITY among its creates: two nodes that create one default mailbox
    /// independently agree on the larger (plan §2.1), which RFC 9051 §2.3.1.1 allows clients to see.
    created: Option<(u32, ChangeId)>,
    name: Option<Reg<String>>,
    subscribed: Option<Reg<bool>>,
    special_use: Option<Reg<Option<SpecialUse>>>,
    /// The join of every delete's `seen`, and the first delete's id.
    deleted: Option<(VersionVector, ChangeId)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    guid: Guid,
    body: Body,
    flags: Flags,
    keywords: Vec<String>,
}

/// One account's replicated state.
///
/// It is also what retention keeps of records it prunes (`Snapshot`): every field is a register
/// or a grow-only set, so two states `join` into the state of the union of their records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountState {
    /// Records applied, so a repeat is skipped cheaply (every op is idempotent anyway). Not kept
    /// in a snapshot: its vector says what it holds.
    #[serde(skip)]
    applied: BTreeSet<ChangeId>,
    mailboxes: BTreeMap<Guid, MailboxRegs>,
    messages: BTreeMap<MsgId, Message>,
    /// Grow-only: expunge beats every flag change and every later sighting.
    expunged: BTreeSet<MsgId>,
    flags: BTreeMap<(MsgId, FlagKey), Reg<bool>>,
    uids: BTreeMap<MsgId, Reg<u32>>,
    /// The largest UID any record claimed for each message: a UID a node may have shown, which
    /// a mailbox that comes back after a delete must number above (`store::replicate`).
    max_claims: BTreeMap<MsgId, u32>,
}

impl AccountState {
    /// Whether no record has named `msg` yet: no creation, expunge, flag change or UID
    /// decision. A new message's `Append` then decides everything about it alone, which lets
    /// the store apply it without recomputing the whole view.
    pub fn untouched(&self, msg: MsgId) -> bool {
        !self.messages.contains_key(&msg)
            && !self.expunged.contains(&msg)
            && !self.uids.contains_key(&msg)
            && self.flags.range((msg, FlagKey::System(0))..).next().is_none_or(|((m, _), _)| *m != msg)
    }

    /// Applies one record; a record already applied changes nothing (invariant I6).
    pub fn apply(&mut self, record: &Record) {
        let id = record.id;
        if !self.applied.insert(id) {
            return;
        }
        match &record.op {
            Op::MailboxCreate { guid, name, uidvalidity, special_use } => {
                let m = self.mailboxes.entry(*guid).or_default();
                // Ties on UIDVALIDITY are broken by id so the stored pair is the same everywhere.
                if m.created.is_none_or(|c| (c.0, c.1) < (*uidvalidity, id)) {
                    m.created = Some((*uidvalidity, id));
                }
                write(&mut m.name, id, name.clone());
                write(&mut m.special_use, id, *special_use);
                write(&mut m.subscribed, id, true);
            }
            Op::MailboxRename { guid, to } => write(&mut self.mailboxes.entry(*guid).or_default().name, id, to.clone()),
            Op::MailboxDelete { guid, seen } => {
                let m = self.mailboxes.entry(*guid).or_default();
                match &mut m.deleted {
                    // A delete names what its node had seen; covered by the join of several
                    // deletes ⇔ covered by one of them, because a change id has a single origin.
                    Some((all, first)) => {
                        all.join(seen);
                        *first = (*first).min(id);
                    }
                    None => m.deleted = Some((seen.clone(), id)),
                }
            }
            Op::Subscribe { guid, on } => write(&mut self.mailboxes.entry(*guid).or_default().subscribed, id, *on),
            Op::SpecialUse { guid, value } => {
                write(&mut self.mailboxes.entry(*guid).or_default().special_use, id, *value)
            }
            Op::Append { guid, uid, body, flags, keywords } => {
                self.add_message(id, *guid, *uid, body, *flags, keywords);
            }
            Op::SetFlags { msg, set, clear } => {
                for (keys, on) in [(set, true), (clear, false)] {
                    for key in keys {
                        let slot = self.flags.entry((*msg, key.clone())).or_insert(Reg { id, value: on });
                        if slot.id < id {
                            *slot = Reg { id, value: on };
                        }
                    }
                }
            }
            Op::Expunge { msgs } => self.expunged.extend(msgs.iter().copied()),
            Op::Move { src, to, uid, body, flags, keywords } => {
                self.expunged.insert(*src);
                self.add_message(id, *to, *uid, body, *flags, keywords);
            }
            Op::UidAssign { assignments } => {
                for &(msg, uid) in assignments {
                    self.claim(msg, id, uid);
                }
            }
        }
    }

    fn add_message(&mut self, id: MsgId, guid: Guid, uid: Option<u32>, body: &Body, flags: Flags, kw: &[String]) {
        let message = Message { guid, body: body.clone(), flags, keywords: kw.to_vec() };
        self.messages.insert(id, message);
        if let Some(uid) = uid {
            self.claim(id, id, uid);
        }
    }

    /// Two claims for one message: the greatest change id wins (plan §2.4 rule 6).
    fn claim(&mut self, msg: MsgId, id: ChangeId, uid: u32) {
        let slot = self.uids.entry(msg).or_insert(Reg { id, value: uid });
        if slot.id < id {
            *slot = Reg { id, value: uid };
        }
        let max = self.max_claims.entry(msg).or_insert(uid);
        *max = (*max).max(uid);
    }

    /// Adds everything `other` holds: the state of the union of both record sets, whatever
    /// each was built from (a snapshot, a log, or both).
    pub fn join(&mut self, other: &AccountState) {
        self.applied.extend(other.applied.iter().copied());
        for (guid, theirs) in &other.mailboxes {
            let m = self.mailboxes.entry(*guid).or_default();
            if let Some(c) = theirs.created {
                if m.created.is_none_or(|mine| mine < c) {
                    m.created = Some(c);
                }
            }
            join_reg(&mut m.name, &theirs.name);
            join_reg(&mut m.subscribed, &theirs.subscribed);
            join_reg(&mut m.special_use, &theirs.special_use);
            if let Some((seen, first)) = &theirs.deleted {
                match &mut m.deleted {
                    Some((all, mine)) => {
                        all.join(seen);
                        *mine = (*mine).min(*first);
                    }
                    None => m.deleted = Some((seen.clone(), *first)),
                }
            }
        }
        for (id, msg) in &other.messages {
            self.messages.entry(*id).or_insert_with(|| msg.clone());
        }
        self.expunged.extend(other.expunged.iter().copied());
        for (key, reg) in &other.flags {
            let slot = self.flags.entry(key.clone()).or_insert_with(|| reg.clone());
            if slot.id < reg.id {
                *slot = reg.clone();
            }
        }
        for (msg, reg) in &other.uids {
            let slot = self.uids.entry(*msg).or_insert_with(|| reg.clone());
            if slot.id < reg.id {
                *slot = reg.clone();
            }
        }
        for (msg, uid) in &other.max_claims {
            let max = self.max_claims.entry(*msg).or_insert(*uid);
            *max = (*max).max(*uid);
        }
    }

    /// Drops what no view can show again: the flag registers of expunged messages (an expunge
    /// beats every flag change), and the applied set (a snapshot's vector says what it holds).
    /// The messages themselves stay: a mailbox delete's add-wins rule looks at every message
    /// ever put in the mailbox, and a tombstone is what keeps an expunged message from coming back.
    pub fn compact(&mut self) {
        let expunged = &self.expunged;
        self.flags.retain(|(msg, _), _| !expunged.contains(msg));
        self.applied.clear();
    }

    /// Each message ever created: its mailbox and body (expunged ones included).
    pub fn message_facts(&self) -> impl Iterator<Item = (MsgId, Guid, &Body)> + '_ {
        self.messages.iter().map(|(id, m)| (*id, m.guid, &m.body))
    }

    /// Each mailbox some record named: whether a record created it, and whether one deleted it.
    pub fn mailbox_facts(&self) -> impl Iterator<Item = (Guid, bool, bool)> + '_ {
        self.mailboxes.iter().map(|(g, m)| (*g, m.created.is_some(), m.deleted.is_some()))
    }

    /// The largest UID claimed for each message.
    pub fn max_claims(&self) -> &BTreeMap<MsgId, u32> {
        &self.max_claims
    }

    /// The flags of a message: per flag, the creation value (with the creating record's id)
    /// unless a later register says otherwise.
    fn flags_of(&self, msg: MsgId, m: &Message) -> (Flags, Vec<String>) {
        let mut flags = m.flags;
        let mut keywords: BTreeSet<String> = m.keywords.iter().cloned().collect();
        let range = (msg, FlagKey::System(0))..;
        for ((_, key), reg) in self.flags.range(range).take_while(|((m, _), _)| *m == msg) {
            // A register older than the message (impossible under HLC causality, but cheap to
            // rule out) does not override the creation value.
            if reg.id < msg {
                continue;
            }
            match key {
                &FlagKey::System(bit) if reg.value => flags = flags.union(Flags(bit)),
                &FlagKey::System(bit) => flags = flags.minus(Flags(bit)),
                FlagKey::Keyword(k) if reg.value => {
                    keywords.insert(k.clone());
                }
                FlagKey::Keyword(k) => {
                    keywords.remove(k.as_str());
                }
            }
        }
        (flags, keywords.into_iter().collect())
    }

    /// What IMAP sessions on a converged node show.
    pub fn view(&self) -> View {
        let mut boxes: BTreeMap<Guid, ViewMailbox> = BTreeMap::new();
        let mut names: Vec<(Guid, String, ChangeId)> = Vec::new();
        for (guid, m) in &self.mailboxes {
            let (Some((uidvalidity, created)), Some(name)) = (m.created, &m.name) else { continue };
            if let Some((seen, _)) = &m.deleted {
                // Add wins (an observed-remove set): a delete removes the mailbox only if it had
                // seen its creation and every message ever put in it. A message added
                // concurrently keeps the mailbox, with only the unseen messages, under its GUID,
                // UIDVALIDITY and UIDs: no UID changes meaning, so no client is misled.
                let unseen_message = self.messages.iter().any(|(id, msg)| msg.guid == *guid && !seen.covers(*id));
                if seen.covers(created) && !unseen_message {
                    continue;
                }
            }
            names.push((*guid, name.value.clone(), name.id));
            boxes.insert(
                *guid,
                ViewMailbox {
                    name: String::new(),
                    uidvalidity,
                    subscribed: m.subscribed.as_ref().is_some_and(|r| r.value),
                    special_use: m.special_use.as_ref().and_then(|r| r.value),
                    messages: BTreeMap::new(),
                    pending: BTreeMap::new(),
                },
            );
        }
        let mut conflicts: BTreeSet<(Guid, u32)> = BTreeSet::new();
        for (&msg, m) in &self.messages {
            if self.expunged.contains(&msg) {
                continue;
            }
            let Some(b) = boxes.get_mut(&m.guid) else { continue };
            let deleted = self.mailboxes.get(&m.guid).and_then(|r| r.deleted.as_ref());
            if deleted.is_some_and(|(seen, _)| seen.covers(msg)) {
                continue;
            }
            let (flags, keywords) = self.flags_of(msg, m);
            let row = ViewMessage { blob: m.body.blob, size: m.body.size, flags, keywords };
            match self.uids.get(&msg) {
                Some(uid) => match b.messages.entry(uid.value) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert((msg, row));
                    }
                    // Two messages claim one UID (a partition): neither is shown there until
                    // the allocator renumbers both (plan §2.4 rule 5).
                    std::collections::btree_map::Entry::Occupied(o) => {
                        conflicts.insert((m.guid, uid.value));
                        let (other, other_row) = o.remove();
                        b.pending.insert(other, other_row);
                        b.pending.insert(msg, row);
                    }
                },
                None => {
                    b.pending.insert(msg, row);
                }
            }
        }
        for (guid, uid) in &conflicts {
            // A third claimant, shown after the first two were moved aside.
            if let Some(b) = boxes.get_mut(guid) {
                if let Some((msg, row)) = b.messages.remove(uid) {
                    b.pending.insert(msg, row);
                }
            }
        }
        for (guid, name) in effective_names(names) {
            if let Some(b) = boxes.get_mut(&guid) {
                b.name = name;
            }
        }
        View { mailboxes: boxes }
    }
}

fn join_reg<T: Clone>(mine: &mut Option<Reg<T>>, theirs: &Option<Reg<T>>) {
    if let Some(t) = theirs {
        write(mine, t.id, t.value.clone());
    }
}

/// What retention keeps of the records it prunes (plan §3.5): their merged state and the
/// records it covers. A peer whose vector does not reach it cannot be sent those records any
/// more; it is sent this instead and joins it into its own state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub vector: VersionVector,
    pub state: AccountState,
}

impl Snapshot {
    /// Folds a pruned record in. Records of one origin are pruned in HLC order, so the vector
    /// stays a prefix per origin.
    pub fn absorb(&mut self, record: &Record) {
        self.state.apply(record);
        self.vector.advance(record.id);
    }

    /// Adds another snapshot: a node that was away receives one and joins it into its own base.
    pub fn join(&mut self, other: &Snapshot) {
        self.state.join(&other.state);
        self.vector.join(&other.vector);
    }
}

/// Mailbox names are registers per GUID, so two GUIDs can claim one name. The one whose name was
/// written first (smaller change id) keeps it; the others show `name~<8 hex of GUID>`, computed
/// rather than written, so every node derives the same names. INBOX is case-insensitive
/// (RFC 9051 §5.1).
fn effective_names(mut names: Vec<(Guid, String, ChangeId)>) -> Vec<(Guid, String)> {
    let fold = |n: &str| if n.eq_ignore_ascii_case("INBOX") { "INBOX".to_string() } else { n.to_string() };
    names.sort_by_key(|a| (fold(&a.1), a.2, a.0));
    let mut taken: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(names.len());
    for (guid, name, _) in names {
        let key = fold(&name);
        if taken.insert(key.clone()) {
            out.push((guid, key));
        } else {
            let hex: String = guid[..4].iter().map(|b| format!("{b:02x}")).collect();
            out.push((guid, format!("{name}~{hex}")));
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct ViewMessage {
    pub blob: [u8; 32],
    pub size: u64,
    pub flags: Flags,
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ViewMailbox {
    pub name: String,
    pub uidvalidity: u32,
    pub subscribed: bool,
    pub special_use: Option<SpecialUse>,
    /// Visible messages by UID.
    pub messages: BTreeMap<u32, (MsgId, ViewMessage)>,
    /// Stored but not yet numbered: waiting for the allocator's decision.
    pub pending: BTreeMap<MsgId, ViewMessage>,
}

/// An account as IMAP shows it, keyed by GUID.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct View {
    pub mailboxes: BTreeMap<Guid, ViewMailbox>,
}

impl View {
    /// The bodies of every message it shows or holds for numbering.
    pub fn live_bodies(&self) -> Vec<[u8; 32]> {
        let mut out: Vec<[u8; 32]> = Vec::new();
        for b in self.mailboxes.values() {
            out.extend(b.messages.values().map(|(_, m)| m.blob));
            out.extend(b.pending.values().map(|m| m.blob));
        }
        out.sort();
        out.dedup();
        out
    }

    /// A digest of the whole view, to compare nodes cheaply (invariant I5).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for (guid, b) in &self.mailboxes {
            h.update(guid);
            h.update(b.name.as_bytes());
            h.update(&[0, b.subscribed as u8, b.special_use.map_or(0, |s| s as u8 + 1)]);
            h.update(&b.uidvalidity.to_be_bytes());
            for (uid, (msg, m)) in &b.messages {
                h.update(&uid.to_be_bytes());
                hash_message(&mut h, *msg, m);
            }
            h.update(b"pending");
            for (msg, m) in &b.pending {
                hash_message(&mut h, *msg, m);
            }
        }
        *h.finalize().as_bytes()
    }
}

fn hash_message(h: &mut blake3::Hasher, msg: MsgId, m: &ViewMessage) {
    h.update(&msg.hlc.to_be_bytes());
    h.update(&msg.node.to_be_bytes());
    h.update(&m.blob);
    h.update(&[m.flags.0]);
    for k in &m.keywords {
        h.update(k.as_bytes());
        h.update(&[0]);
    }
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
