//! Shared by the replication simulations: random user actions chosen from what a node shows, an
//! observer that checks what its IMAP clients are shown at every step, the allocator's decision,
//! and the checks after convergence.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::merge::{Body, FlagKey, Guid, MsgId, Op, Record, View, ViewMessage};
use super::projection::{Projection, Report};
use crate::store::{ChangeId, Flags, VersionVector};

const NAMES: [&str; 4] = ["Work", "Lists", "Work/2026", "inbox"];

/// Every node creates the account's INBOX on its own, with this GUID.
pub fn inbox() -> Guid {
    [1; 16]
}

pub fn create_inbox(uidvalidity: u32) -> Op {
    Op::MailboxCreate { guid: inbox(), name: "INBOX".into(), uidvalidity, special_use: None }
}

/// What one node's IMAP clients have been shown, checked at every step.
#[derive(Default)]
pub struct Observer {
    pub proj: Projection,
    /// Everything ever shown: (GUID, UIDVALIDITY, UID) → message.
    observed: BTreeMap<(Guid, u32, u32), MsgId>,
    /// Per mailbox the last (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) shown.
    counters: BTreeMap<Guid, (u32, u32, u64)>,
    /// What the projection last reported, per mailbox: what the allocator hears.
    pub report: BTreeMap<Guid, Report>,
}

impl Observer {
    /// Refreshes the projection as the node's IMAP sessions would and checks I3 (no UID reused)
    /// and I4 (UIDNEXT and HIGHESTMODSEQ never go down).
    pub fn observe(&mut self, node: u32, view: &View) {
        for (guid, (_, report)) in self.proj.refresh(view) {
            let (uidvalidity, history) = self.proj.history(&guid).expect("refreshed");
            let uidnext = self.proj.uidnext(&guid).expect("refreshed");
            let modseq = self.proj.highest_modseq(&guid).expect("refreshed");
            if let Some(&(v0, n0, m0)) = self.counters.get(&guid) {
                assert!(uidvalidity >= v0, "node {node}: UIDVALIDITY went down");
                if uidvalidity == v0 {
                    assert!(uidnext >= n0, "node {node}: UIDNEXT went down (I4)");
                }
                assert!(modseq >= m0, "node {node}: HIGHESTMODSEQ went down (I4)");
            }
            self.counters.insert(guid, (uidvalidity, uidnext, modseq));
            for (&uid, &msg) in history {
                let seen = self.observed.entry((guid, uidvalidity, uid)).or_insert(msg);
                assert_eq!(*seen, msg, "node {node}: UID {uid} reused for another message (I3)");
            }
            for (uid, msg) in self.proj.shown(&guid) {
                assert!(uid < uidnext && history.get(&uid) == Some(&msg));
            }
            self.report.insert(guid, report);
        }
    }
}

fn body(rng: &mut StdRng) -> Body {
    Body { blob: rng.gen(), size: rng.gen_range(1..100_000), internal_date: 0, tz_offset_minutes: 0 }
}

fn flag_keys(rng: &mut StdRng) -> Vec<FlagKey> {
    let mut keys = Vec::new();
    for _ in 0..rng.gen_range(1..3) {
        keys.push(if rng.gen_bool(0.7) {
            FlagKey::System(1 << rng.gen_range(0..5))
        } else {
            FlagKey::Keyword(["$Junk", "work", "$Forwarded"][rng.gen_range(0..3)].into())
        });
    }
    keys
}

/// One user action chosen from what a node shows (`seen` is what it holds, for a delete), or
/// `None` when the dice chose something impossible there.
pub fn random_op(rng: &mut StdRng, view: &View, seen: &VersionVector) -> Option<Op> {
    let guids: Vec<Guid> = view.mailboxes.keys().copied().collect();
    let guid = *guids.choose(rng)?;
    let b = &view.mailboxes[&guid];
    let visible: Vec<(MsgId, ViewMessage)> = b.messages.values().cloned().collect();
    let uidnext = b.messages.keys().next_back().map_or(1, |u| u + 1);
    Some(match rng.gen_range(0..90) {
        0..=5 => Op::MailboxCreate {
            guid: rng.gen(),
            name: NAMES[rng.gen_range(0..NAMES.len())].into(),
            uidvalidity: rng.gen_range(1..1000),
            special_use: None,
        },
        6..=8 if guid != inbox() => Op::MailboxRename { guid, to: NAMES[rng.gen_range(0..NAMES.len())].into() },
        9..=11 if guid != inbox() => Op::MailboxDelete { guid, seen: seen.clone() },
        12..=13 => Op::Subscribe { guid, on: rng.gen() },
        14..=40 => {
            let uid = rng.gen_bool(0.85).then_some(uidnext);
            let body = body(rng);
            Op::Append { guid, uid, body, flags: Flags(rng.gen_range(0..32)), keywords: vec![] }
        }
        41..=60 if !visible.is_empty() => {
            let (msg, _) = visible.choose(rng)?.clone();
            let set = flag_keys(rng);
            let clear = flag_keys(rng).into_iter().filter(|k| !set.contains(k)).collect();
            Op::SetFlags { msg, set, clear }
        }
        61..=70 if !visible.is_empty() => {
            let msgs = visible.choose_multiple(rng, 2).map(|(m, _)| *m).collect();
            Op::Expunge { msgs }
        }
        71..=80 if !visible.is_empty() => {
            let (src, row) = visible.choose(rng)?.clone();
            let to = *guids.choose(rng)?;
            let to_next = view.mailboxes[&to].messages.keys().next_back().map_or(1, |u| u + 1);
            let body = Body { blob: row.blob, size: row.size, internal_date: 0, tz_offset_minutes: 0 };
            let (flags, keywords) = (row.flags, row.keywords);
            if rng.gen_bool(0.5) {
                Op::Move { src, to, uid: Some(to_next), body, flags, keywords }
            } else {
                Op::Append { guid: to, uid: Some(to_next), body, flags, keywords }
            }
        }
        _ => return None,
    })
}

/// After convergence: I1 (every message some record created is shown, unless a record removed
/// it; every acknowledged one was created by a surviving record) and I2 (nothing removed is
/// shown), checked against the record set itself.
pub fn check_outcome(seed: u64, view: &View, records: &[Record], acked: &BTreeSet<MsgId>) {
    let mut expunged = BTreeSet::new();
    let mut created = Vec::new();
    let mut deletes: BTreeMap<Guid, VersionVector> = BTreeMap::new();
    for r in records {
        match &r.op {
            Op::Expunge { msgs } => expunged.extend(msgs.iter().copied()),
            Op::Move { src, to, .. } => {
                expunged.insert(*src);
                created.push((r.id, *to));
            }
            Op::Append { guid, .. } => created.push((r.id, *guid)),
            Op::MailboxDelete { guid, seen } => {
                let d = deletes.entry(*guid).or_default();
                for (node, hlc) in seen.iter() {
                    d.advance(ChangeId { hlc, node });
                }
            }
            _ => {}
        }
    }
    let ids: BTreeSet<MsgId> = created.iter().map(|(m, _)| *m).collect();
    for m in acked {
        assert!(ids.contains(m), "seed {seed}: acknowledged message {m:?} lost (I1)");
    }
    let mut shown = BTreeMap::new();
    for (guid, b) in &view.mailboxes {
        for msg in b.messages.values().map(|(m, _)| m).chain(b.pending.keys()) {
            assert!(shown.insert(*msg, *guid).is_none(), "seed {seed}: a message shown twice");
        }
    }
    for (msg, guid) in created {
        let removed = expunged.contains(&msg) || deletes.get(&guid).is_some_and(|s| s.covers(msg));
        match shown.get(&msg) {
            Some(g) => {
                assert!(!removed, "seed {seed}: expunged message {msg:?} came back (I2)");
                assert_eq!(*g, guid, "seed {seed}: message in the wrong mailbox");
            }
            None => assert!(removed, "seed {seed}: message {msg:?} lost (I1)"),
        }
    }
}

/// After convergence every node shows every message at the same UID, and nothing waits.
pub fn check_numbering<'a>(seed: u64, view: &View, observers: impl Iterator<Item = &'a Observer> + Clone) {
    for (guid, b) in &view.mailboxes {
        assert!(b.pending.is_empty(), "seed {seed}: messages still without a UID");
        let expect: BTreeMap<u32, MsgId> = b.messages.iter().map(|(u, (m, _))| (*u, *m)).collect();
        for (i, o) in observers.clone().enumerate() {
            assert_eq!(o.proj.shown(guid), expect, "seed {seed}: node #{i} shows other UIDs");
            assert!(o.report[guid].held.is_empty(), "seed {seed}: node #{i} still holds messages back");
        }
    }
}
