//! Random multi-node histories: each node acts on what it has seen, records travel per origin in
//! order but with any interleaving and delay, and some are delivered twice. After everything is
//! delivered every node must show the same view (I5), a duplicate must change nothing (I6), any
//! arrival order of the same records must give that view (I7), no acknowledged message may be
//! lost (I1) and no expunged one may come back (I2).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::sync::projection::{Projection, Report};

const NAMES: [&str; 4] = ["Work", "Lists", "Work/2026", "inbox"];

fn inbox() -> Guid {
    [1; 16]
}

struct Node {
    id: u32,
    hlc: u64,
    skew: i64,
    state: AccountState,
    /// Per origin (index), how many of its records this node has applied.
    got: Vec<usize>,
    proj: Projection,
    /// Everything this node's clients were ever shown: (GUID, UIDVALIDITY, UID) → message.
    observed: BTreeMap<(Guid, u32, u32), MsgId>,
    /// Per mailbox the last (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) shown.
    counters: BTreeMap<Guid, (u32, u32, u64)>,
    /// What this node's projection last reported, per mailbox.
    report: BTreeMap<Guid, Report>,
}

struct Sim {
    rng: StdRng,
    nodes: Vec<Node>,
    logs: Vec<Vec<Record>>,
    step: u64,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = (0..n)
            .map(|i| Node {
                id: 100 + i as u32,
                hlc: 0,
                skew: rng.gen_range(-50..50),
                state: AccountState::default(),
                got: vec![0; n],
                proj: Projection::default(),
                observed: BTreeMap::new(),
                counters: BTreeMap::new(),
                report: BTreeMap::new(),
            })
            .collect();
        let mut sim = Sim { rng, nodes, logs: vec![Vec::new(); n], step: 0 };
        // Every node creates the account on its own: one INBOX GUID, different UIDVALIDITYs.
        for i in 0..n {
            let uidvalidity = 10 + i as u32;
            sim.commit(i, Op::MailboxCreate { guid: inbox(), name: "INBOX".into(), uidvalidity, special_use: None });
        }
        sim
    }

    fn tick(&mut self, i: usize) -> ChangeId {
        let physical = ((self.step as i64 * 100 + self.nodes[i].skew).max(0) as u64) << 16;
        let node = &mut self.nodes[i];
        node.hlc = physical.max(node.hlc + 1);
        ChangeId { hlc: node.hlc, node: node.id }
    }

    fn commit(&mut self, i: usize, op: Op) -> ChangeId {
        let id = self.tick(i);
        let record = Record { id, op };
        self.nodes[i].state.apply(&record);
        self.logs[i].push(record);
        self.nodes[i].got[i] = self.logs[i].len();
        self.observe(i);
        id
    }

    /// Refreshes node `i`'s projection as its IMAP sessions would, and checks I3 and I4 on what
    /// its clients are shown, at every step.
    fn observe(&mut self, i: usize) {
        let view = self.nodes[i].state.view();
        let node = &mut self.nodes[i];
        for (guid, (_, report)) in node.proj.refresh(&view) {
            let (uidvalidity, history) = node.proj.history(&guid).expect("refreshed");
            let uidnext = node.proj.uidnext(&guid).expect("refreshed");
            let modseq = node.proj.highest_modseq(&guid).expect("refreshed");
            if let Some(&(v0, n0, m0)) = node.counters.get(&guid) {
                assert!(uidvalidity >= v0, "node {}: UIDVALIDITY went down", node.id);
                if uidvalidity == v0 {
                    assert!(uidnext >= n0, "node {}: UIDNEXT went down (I4)", node.id);
                }
                assert!(modseq >= m0, "node {}: HIGHESTMODSEQ went down (I4)", node.id);
            }
            node.counters.insert(guid, (uidvalidity, uidnext, modseq));
            for (&uid, &msg) in history {
                let seen = node.observed.entry((guid, uidvalidity, uid)).or_insert(msg);
                assert_eq!(*seen, msg, "node {}: UID {uid} reused for another message (I3)", node.id);
            }
            for (uid, msg) in node.proj.shown(&guid) {
                assert!(uid < uidnext && history.get(&uid) == Some(&msg));
            }
            node.report.insert(guid, report);
        }
    }

    /// The allocator (node 0): every message pending in its view or held back by any node, and
    /// both messages of a UID conflict, get UIDs above every UIDNEXT it knows (plan §2.4 rule 5).
    /// Reports of other nodes reach it with their records, so they may be stale, which only
    /// costs another round.
    fn allocate(&mut self) -> bool {
        let view = self.nodes[0].state.view();
        let mut assignments = Vec::new();
        for (guid, b) in &view.mailboxes {
            let mut set: BTreeSet<MsgId> = b.pending.keys().copied().collect();
            let mut next = b.messages.keys().next_back().map_or(1, |u| u + 1);
            for node in &self.nodes {
                if let Some(r) = node.report.get(guid) {
                    next = next.max(r.uidnext);
                    set.extend(
                        r.held
                            .iter()
                            .filter(|m| b.pending.contains_key(m) || b.messages.values().any(|(x, _)| x == *m)),
                    );
                }
            }
            for (k, msg) in set.into_iter().enumerate() {
                assignments.push((msg, next + k as u32));
            }
        }
        if assignments.is_empty() {
            return false;
        }
        self.commit(0, Op::UidAssign { assignments });
        true
    }

    /// Moves up to `k` of origin `o`'s records to node `i`, in the origin's order.
    fn deliver(&mut self, i: usize, o: usize, k: usize) {
        let end = (self.nodes[i].got[o] + k).min(self.logs[o].len());
        for r in self.nodes[i].got[o]..end {
            let record = self.logs[o][r].clone();
            let node = &mut self.nodes[i];
            node.hlc = node.hlc.max(record.id.hlc);
            node.state.apply(&record);
            if self.rng.gen_bool(0.1) {
                node.state.apply(&record); // a duplicated frame
            }
        }
        self.nodes[i].got[o] = end;
        self.observe(i);
    }

    fn seen(&self, i: usize) -> VersionVector {
        let mut seen = VersionVector::default();
        for (o, &n) in self.nodes[i].got.iter().enumerate() {
            if n > 0 {
                let id = self.logs[o][n - 1].id;
                seen.0.insert(id.node, id.hlc);
            }
        }
        seen
    }

    fn body(&mut self) -> Body {
        Body { blob: self.rng.gen(), size: self.rng.gen_range(1..100_000), internal_date: 0, tz_offset_minutes: 0 }
    }

    fn flag_keys(&mut self) -> Vec<FlagKey> {
        let mut keys = Vec::new();
        for _ in 0..self.rng.gen_range(1..3) {
            keys.push(if self.rng.gen_bool(0.7) {
                FlagKey::System(1 << self.rng.gen_range(0..5))
            } else {
                FlagKey::Keyword(["$Junk", "work", "$Forwarded"][self.rng.gen_range(0..3)].into())
            });
        }
        keys
    }

    /// One user action on node `i`, chosen from what that node shows.
    fn act(&mut self, i: usize) {
        let view = self.nodes[i].state.view();
        let guids: Vec<Guid> = view.mailboxes.keys().copied().collect();
        let guid = *guids.choose(&mut self.rng).expect("INBOX always exists");
        let b = &view.mailboxes[&guid];
        let visible: Vec<(MsgId, ViewMessage)> = b.messages.values().cloned().collect();
        let uidnext = b.messages.keys().next_back().map_or(1, |u| u + 1);
        let op = match self.rng.gen_range(0..100) {
            0..=5 => Op::MailboxCreate {
                guid: self.rng.gen(),
                name: NAMES[self.rng.gen_range(0..NAMES.len())].into(),
                uidvalidity: self.rng.gen_range(1..1000),
                special_use: None,
            },
            6..=8 if guid != inbox() => {
                Op::MailboxRename { guid, to: NAMES[self.rng.gen_range(0..NAMES.len())].into() }
            }
            9..=11 if guid != inbox() => Op::MailboxDelete { guid, seen: self.seen(i) },
            12..=13 => Op::Subscribe { guid, on: self.rng.gen() },
            14..=40 => {
                let uid = self.rng.gen_bool(0.85).then_some(uidnext);
                let body = self.body();
                Op::Append { guid, uid, body, flags: Flags(self.rng.gen_range(0..32)), keywords: vec![] }
            }
            41..=60 if !visible.is_empty() => {
                let (msg, _) = visible.choose(&mut self.rng).expect("not empty").clone();
                let set = self.flag_keys();
                let clear = self.flag_keys().into_iter().filter(|k| !set.contains(k)).collect();
                Op::SetFlags { msg, set, clear }
            }
            61..=70 if !visible.is_empty() => {
                let msgs = visible.choose_multiple(&mut self.rng, 2).map(|(m, _)| *m).collect();
                Op::Expunge { msgs }
            }
            71..=80 if !visible.is_empty() => {
                let (src, row) = visible.choose(&mut self.rng).expect("not empty").clone();
                let to = *guids.choose(&mut self.rng).expect("not empty");
                let to_next = view.mailboxes[&to].messages.keys().next_back().map_or(1, |u| u + 1);
                let body = Body { blob: row.blob, size: row.size, internal_date: 0, tz_offset_minutes: 0 };
                let (flags, keywords) = (row.flags, row.keywords);
                if self.rng.gen_bool(0.5) {
                    Op::Move { src, to, uid: Some(to_next), body, flags, keywords }
                } else {
                    Op::Append { guid: to, uid: Some(to_next), body, flags, keywords }
                }
            }
            81..=90 if i == 0 => {
                self.allocate();
                return;
            }
            _ => return,
        };
        self.commit(i, op);
    }

    fn run(&mut self, steps: usize) {
        let n = self.nodes.len();
        for _ in 0..steps {
            self.step += 1;
            let i = self.rng.gen_range(0..n);
            if self.rng.gen_bool(0.6) {
                self.act(i);
            } else {
                let o = self.rng.gen_range(0..n);
                let k = self.rng.gen_range(1..6);
                self.deliver(i, o, k);
            }
        }
    }

    /// Delivers everything that is left, origins interleaved at random.
    fn quiesce(&mut self) {
        let n = self.nodes.len();
        loop {
            let behind: Vec<(usize, usize)> = (0..n)
                .flat_map(|i| (0..n).map(move |o| (i, o)))
                .filter(|&(i, o)| self.nodes[i].got[o] < self.logs[o].len())
                .collect();
            let Some(&(i, o)) = behind.choose(&mut self.rng) else { break };
            let k = self.rng.gen_range(1..4);
            self.deliver(i, o, k);
        }
    }

    /// Quiescence with the allocator at work: deliver everything, let the allocator renumber,
    /// until nothing is pending or held anywhere.
    fn settle(&mut self, seed: u64) {
        for _round in 0..20 {
            self.quiesce();
            if !self.allocate() {
                return;
            }
        }
        panic!("seed {seed}: UID allocation did not settle in 20 rounds");
    }

    fn all_records(&self) -> Vec<Record> {
        self.logs.iter().flatten().cloned().collect()
    }
}

fn check_seed(seed: u64, nodes: usize, steps: usize) {
    let mut sim = Sim::new(seed, nodes);
    sim.run(steps);
    sim.settle(seed);
    let view = sim.nodes[0].state.view();
    for node in &sim.nodes[1..] {
        assert_eq!(node.state.view(), view, "seed {seed}: node {} differs from node 100 (I5)", node.id);
    }
    // Converged: nothing waits for a UID, and every node shows every message at its UID, so a
    // client that fails over from one node to another sees the same numbering.
    for (guid, b) in &view.mailboxes {
        assert!(b.pending.is_empty(), "seed {seed}: messages still without a UID");
        let expect: BTreeMap<u32, MsgId> = b.messages.iter().map(|(u, (m, _))| (*u, *m)).collect();
        for node in &sim.nodes {
            assert_eq!(node.proj.shown(guid), expect, "seed {seed}: node {} shows other UIDs", node.id);
            assert!(node.report[guid].held.is_empty());
        }
    }

    // I7: any order of the same set, even one that breaks each origin's order.
    let mut records = sim.all_records();
    records.shuffle(&mut sim.rng);
    let mut fresh = AccountState::default();
    for r in &records {
        fresh.apply(r);
    }
    assert_eq!(fresh.view().digest(), view.digest(), "seed {seed}: arrival order changed the result (I7)");

    // I6: every record again changes nothing.
    for r in &records {
        fresh.apply(r);
    }
    assert_eq!(fresh.view(), view, "seed {seed}: re-applying changed the result (I6)");

    // I1 and I2 against the record set itself.
    let mut expunged = BTreeSet::new();
    let mut created = Vec::new();
    let mut deletes: BTreeMap<Guid, VersionVector> = BTreeMap::new();
    for r in &records {
        match &r.op {
            Op::Expunge { msgs } => expunged.extend(msgs.iter().copied()),
            Op::Move { src, to, .. } => {
                expunged.insert(*src);
                created.push((r.id, *to));
            }
            Op::Append { guid, .. } => created.push((r.id, *guid)),
            Op::MailboxDelete { guid, seen } => join(deletes.entry(*guid).or_default(), seen),
            _ => {}
        }
    }
    let mut shown = BTreeMap::new();
    for (guid, b) in &view.mailboxes {
        for (msg, _) in b.messages.values() {
            assert!(shown.insert(*msg, *guid).is_none(), "seed {seed}: a message shown twice");
        }
        for msg in b.pending.keys() {
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
    // UIDs are unique per mailbox by construction of the map; UIDVALIDITY of the shared INBOX
    // is the larger one.
    let inbox = &view.mailboxes[&inbox()];
    assert_eq!(inbox.uidvalidity, 9 + nodes as u32, "seed {seed}");
    assert_eq!(inbox.name, "INBOX");
}

#[test]
fn random_histories_converge_two_nodes() {
    for seed in 0..300 {
        check_seed(seed, 2, 200);
    }
}

#[test]
fn random_histories_converge_three_nodes() {
    for seed in 1000..1300 {
        check_seed(seed, 3, 300);
    }
}

fn id(hlc: u64, node: u32) -> ChangeId {
    ChangeId { hlc, node }
}

fn body(b: u8) -> Body {
    Body { blob: [b; 32], size: 10, internal_date: 0, tz_offset_minutes: 0 }
}

fn rec(hlc: u64, node: u32, op: Op) -> Record {
    Record { id: id(hlc, node), op }
}

fn create(hlc: u64, guid: u8, name: &str) -> Record {
    rec(hlc, 1, Op::MailboxCreate { guid: [guid; 16], name: name.into(), uidvalidity: 7, special_use: None })
}

fn append(hlc: u64, node: u32, guid: u8, uid: u32) -> Record {
    let op = Op::Append { guid: [guid; 16], uid: Some(uid), body: body(hlc as u8), flags: Flags(0), keywords: vec![] };
    rec(hlc, node, op)
}

fn state(records: &[Record]) -> View {
    let mut s = AccountState::default();
    records.iter().for_each(|r| s.apply(r));
    s.view()
}

#[test]
fn expunge_beats_a_later_flag_change_and_concurrent_flags_merge_per_flag() {
    let a = append(10, 1, 5, 1);
    let seen = Op::SetFlags { msg: id(10, 1), set: vec![FlagKey::System(Flags::SEEN.0)], clear: vec![] };
    let flagged = Op::SetFlags { msg: id(10, 1), set: vec![FlagKey::System(Flags::FLAGGED.0)], clear: vec![] };
    let unseen = Op::SetFlags { msg: id(10, 1), set: vec![], clear: vec![FlagKey::System(Flags::SEEN.0)] };
    // Node 1 sets \Seen at 20, node 2 \Flagged at 21, node 2 clears \Seen at 19 (older: loses).
    let v = state(&[create(1, 5, "Box"), a.clone(), rec(20, 1, seen), rec(21, 2, flagged), rec(19, 2, unseen)]);
    let flags = v.mailboxes[&[5; 16]].messages[&1].1.flags;
    assert_eq!(flags, Flags::SEEN.union(Flags::FLAGGED));

    let expunge = rec(15, 2, Op::Expunge { msgs: vec![id(10, 1)] });
    let late_flag = rec(30, 1, Op::SetFlags { msg: id(10, 1), set: vec![FlagKey::Keyword("x".into())], clear: vec![] });
    let v = state(&[late_flag, expunge, create(1, 5, "Box"), a]);
    assert!(v.mailboxes[&[5; 16]].messages.is_empty());
}

#[test]
fn move_against_expunge_keeps_the_moved_copy_and_two_moves_keep_both() {
    let a = append(10, 1, 5, 1);
    let mv = |hlc, node, to: u8| {
        rec(
            hlc,
            node,
            Op::Move { src: id(10, 1), to: [to; 16], uid: Some(1), body: body(9), flags: Flags(0), keywords: vec![] },
        )
    };
    let expunge = rec(20, 2, Op::Expunge { msgs: vec![id(10, 1)] });
    let v = state(&[create(1, 5, "A"), create(2, 6, "B"), create(3, 7, "C"), a, mv(20, 1, 6), expunge, mv(21, 3, 7)]);
    assert!(v.mailboxes[&[5; 16]].messages.is_empty());
    assert_eq!(v.mailboxes[&[6; 16]].messages[&1].0, id(20, 1));
    assert_eq!(v.mailboxes[&[7; 16]].messages[&1].0, id(21, 3));
}

#[test]
fn a_delete_keeps_the_mailbox_for_messages_it_had_not_seen() {
    let seen_10 = VersionVector([(1, 10)].into_iter().collect());
    let delete = rec(30, 1, Op::MailboxDelete { guid: [5; 16], seen: seen_10 });
    // Node 2 delivered at 12 before it saw the delete: that message keeps the mailbox.
    let v = state(&[create(1, 5, "A"), append(10, 1, 5, 1), append(12, 2, 5, 2), delete.clone()]);
    let b = &v.mailboxes[&[5; 16]];
    assert_eq!((b.name.as_str(), b.uidvalidity), ("A", 7));
    assert_eq!(b.messages.keys().copied().collect::<Vec<_>>(), vec![2]);
    // Without it the mailbox is gone.
    let v = state(&[create(1, 5, "A"), append(10, 1, 5, 1), delete]);
    assert!(v.mailboxes.is_empty());
}

#[test]
fn uid_conflicts_hide_both_messages_until_the_allocator_renumbers_them() {
    let v = state(&[create(1, 5, "A"), append(10, 1, 5, 1), append(11, 2, 5, 1), append(12, 3, 5, 1)]);
    let b = &v.mailboxes[&[5; 16]];
    assert!(b.messages.is_empty());
    assert_eq!(b.pending.len(), 3);
    let assign = rec(20, 1, Op::UidAssign { assignments: vec![(id(10, 1), 2), (id(11, 2), 3), (id(12, 3), 4)] });
    let v = state(&[create(1, 5, "A"), append(10, 1, 5, 1), append(11, 2, 5, 1), append(12, 3, 5, 1), assign]);
    let b = &v.mailboxes[&[5; 16]];
    assert_eq!(b.messages.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
    assert!(b.pending.is_empty());
}

#[test]
fn name_collisions_resolve_the_same_way_everywhere() {
    let rename = rec(5, 2, Op::MailboxRename { guid: [6; 16], to: "A".into() });
    let v = state(&[create(1, 5, "A"), create(2, 6, "B"), rename]);
    assert_eq!(v.mailboxes[&[5; 16]].name, "A");
    assert_eq!(v.mailboxes[&[6; 16]].name, "A~06060606");
    let v = state(&[create(1, 5, "inbox"), create(2, 6, "INBOX")]);
    assert_eq!(v.mailboxes[&[5; 16]].name, "INBOX");
    assert_eq!(v.mailboxes[&[6; 16]].name, "INBOX~06060606");
}
