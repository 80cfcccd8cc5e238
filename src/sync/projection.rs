//! What one node has shown its IMAP clients, and the rule that keeps it honest when replicated
//! state changes under it (plan §2.4 rule 4).
//!
//! The merged [`View`] is the same on every node, but clients have already been shown UIDs, a
//! UIDNEXT and a HIGHESTMODSEQ by *this* node. RFC 9051 §2.3.1.1: UIDs ascend as messages are
//! added and a UID never names another message within one UIDVALIDITY; RFC 7162 §3.1.2.1:
//! HIGHESTMODSEQ never goes down. So a message that the merged state puts at a UID below this
//! node's UIDNEXT (and not already shown there) is held back instead of shown, and reported, so
//! the allocator gives it a new UID above every node's UIDNEXT.

use std::collections::{BTreeMap, BTreeSet};

use super::merge::{Guid, MsgId, Op, View, ViewMessage};

#[derive(Debug, Clone, Default)]
struct Shown {
    uidvalidity: u32,
    uidnext: u32,
    highest_modseq: u64,
    messages: BTreeMap<u32, (MsgId, ViewMessage)>,
    /// Every UID ever shown under this UIDVALIDITY and its message: a UID is never reused.
    history: BTreeMap<u32, MsgId>,
}

/// What a refresh changed in one mailbox, as IMAP would announce it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub expunged: Vec<u32>,
    pub added: Vec<u32>,
    pub flags: Vec<u32>,
    /// A new UIDVALIDITY: clients must forget the mailbox.
    pub reset: bool,
}

/// Per mailbox, this node's UIDNEXT and the messages held back for renumbering.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub uidnext: u32,
    pub held: Vec<MsgId>,
}

#[derive(Debug, Clone, Default)]
pub struct Projection {
    boxes: BTreeMap<Guid, Shown>,
}

impl Projection {
    /// Brings what clients see in line with `view`. Returns, per mailbox, the announced changes
    /// and this node's report for the allocator.
    pub fn refresh(&mut self, view: &View) -> BTreeMap<Guid, (Changes, Report)> {
        let mut out = BTreeMap::new();
        for (guid, shown) in self.boxes.iter_mut() {
            if !view.mailboxes.contains_key(guid) && !shown.messages.is_empty() {
                // The mailbox was deleted: its messages are gone, but its history stays in case
                // a concurrent delivery brings it back under the same UIDVALIDITY.
                let expunged: Vec<u32> = shown.messages.keys().copied().collect();
                shown.messages.clear();
                shown.highest_modseq += 1;
                let report = Report { uidnext: shown.uidnext, held: Vec::new() };
                out.insert(*guid, (Changes { expunged, ..Changes::default() }, report));
            }
        }
        for (guid, b) in &view.mailboxes {
            let shown = self.boxes.entry(*guid).or_default();
            let mut changes = Changes::default();
            if b.uidvalidity != shown.uidvalidity {
                // Only ever upwards (the merge keeps the larger), and only with a fresh history.
                debug_assert!(b.uidvalidity > shown.uidvalidity);
                *shown = Shown {
                    uidvalidity: b.uidvalidity,
                    uidnext: 1,
                    highest_modseq: shown.highest_modseq,
                    ..Shown::default()
                };
                changes.reset = true;
            }
            let mut modified = false;
            shown.messages.retain(|uid, (msg, row)| match b.messages.get(uid) {
                Some((m, new_row)) if m == msg => {
                    if new_row != row {
                        *row = new_row.clone();
                        changes.flags.push(*uid);
                        modified = true;
                    }
                    true
                }
                _ => {
                    changes.expunged.push(*uid);
                    modified = true;
                    false
                }
            });
            let mut held: Vec<MsgId> = b.pending.keys().copied().collect();
            for (&uid, (msg, row)) in &b.messages {
                if shown.messages.get(&uid).is_some_and(|(m, _)| m == msg) {
                    continue;
                }
                if uid >= shown.uidnext {
                    shown.messages.insert(uid, (*msg, row.clone()));
                    shown.history.insert(uid, *msg);
                    shown.uidnext = uid + 1;
                    changes.added.push(uid);
                    modified = true;
                } else {
                    held.push(*msg);
                }
            }
            if modified {
                shown.highest_modseq += 1;
            }
            held.sort();
            out.insert(*guid, (changes, Report { uidnext: shown.uidnext, held }));
        }
        out
    }

    pub fn uidnext(&self, guid: &Guid) -> Option<u32> {
        self.boxes.get(guid).map(|s| s.uidnext)
    }

    pub fn highest_modseq(&self, guid: &Guid) -> Option<u64> {
        self.boxes.get(guid).map(|s| s.highest_modseq)
    }

    /// UID → message as clients currently see it.
    pub fn shown(&self, guid: &Guid) -> BTreeMap<u32, MsgId> {
        self.boxes.get(guid).map(|s| s.messages.iter().map(|(u, (m, _))| (*u, *m)).collect()).unwrap_or_default()
    }

    /// Every UID this node has shown under the current UIDVALIDITY, with its message.
    pub fn history(&self, guid: &Guid) -> Option<(u32, &BTreeMap<u32, MsgId>)> {
        self.boxes.get(guid).map(|s| (s.uidvalidity, &s.history))
    }
}

/// The allocator's decision (plan §2.4 rule 5): every message pending in its view or held back
/// by a node that reported, gets a UID above every UIDNEXT it knows. Reports may be stale, which
/// only costs another round.
pub fn allocation<'a>(view: &View, reports: impl Iterator<Item = &'a BTreeMap<Guid, Report>> + Clone) -> Option<Op> {
    let mut assignments = Vec::new();
    for (guid, b) in &view.mailboxes {
        let mut set: BTreeSet<MsgId> = b.pending.keys().copied().collect();
        let mut next = b.messages.keys().next_back().map_or(1, |u| u + 1);
        let mut uid_of: Option<BTreeMap<MsgId, u32>> = None;
        for r in reports.clone().filter_map(|r| r.get(guid)) {
            next = next.max(r.uidnext);
            if r.held.is_empty() {
                continue;
            }
            let uids = uid_of.get_or_insert_with(|| b.messages.iter().map(|(u, (m, _))| (*m, *u)).collect());
            // A held message already numbered at or above that node's UIDNEXT only waits for the
            // node to learn its number (the report predates it): numbering it again would churn.
            let unsafe_there = |m: &&MsgId| b.pending.contains_key(m) || uids.get(m).is_some_and(|u| *u < r.uidnext);
            set.extend(r.held.iter().filter(unsafe_there));
        }
        for (k, msg) in set.into_iter().enumerate() {
            assignments.push((msg, next + k as u32));
        }
    }
    (!assignments.is_empty()).then_some(Op::UidAssign { assignments })
}
