//! Random multi-node histories: each node acts on what it has seen, records travel per origin in
//! order but with any interleaving and delay, and some are delivered twice. After everything is
//! delivered every node must show the same view (I5), a duplicate must change nothing (I6), any
//! arrival order of the same records must give that view (I7), no acknowledged message may be
//! lost (I1) and no expunged one may come back (I2).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::sync::testkit::{self, inbox, Observer};

struct Node {
    id: u32,
    hlc: u64,
    skew: i64,
    state: AccountState,
    /// Per origin (index), how many of its records this node has applied.
    got: Vec<usize>,
    obs: Observer,
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
                obs: Observer::default(),
            })
            .collect();
        let mut sim = Sim { rng, nodes, logs: vec![Vec::new(); n], step: 0 };
        // Every node creates the account on its own: one INBOX GUID, different UIDVALIDITYs.
        for i in 0..n {
            sim.commit(i, testkit::create_inbox(10 + i as u32));
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

    fn observe(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.obs.observe(node.id, &node.state.view());
    }

    /// The allocator is node 0; it hears every node's latest report.
    fn allocate(&mut self) -> bool {
        let view = self.nodes[0].state.view();
        let Some(op) = crate::sync::projection::allocation(&view, self.nodes.iter().map(|n| &n.obs.report)) else {
            return false;
        };
        self.commit(0, op);
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

    /// One user action on node `i` (node 0 sometimes allocates instead).
    fn act(&mut self, i: usize) {
        if i == 0 && self.rng.gen_bool(0.1) {
            self.allocate();
            return;
        }
        let view = self.nodes[i].state.view();
        let seen = self.seen(i);
        if let Some(op) = testkit::random_op(&mut self.rng, &view, &seen) {
            self.commit(i, op);
        }
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
    testkit::check_numbering(seed, &view, sim.nodes.iter().map(|n| &n.obs));

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

    // Retention: any split of the set into two parts, one compacted into a snapshot that goes
    // through postcard, joins into the state of the whole set (the sender's base and the
    // receiver's own records), in either direction of the join.
    let cut = sim.rng.gen_range(0..=records.len());
    let (old, new) = records.split_at(cut);
    let mut snapshot = crate::sync::merge::Snapshot::default();
    for r in old {
        snapshot.absorb(r);
    }
    snapshot.state.compact();
    let snapshot: crate::sync::merge::Snapshot =
        postcard::from_bytes(&postcard::to_allocvec(&snapshot).expect("encodes")).expect("decodes");
    let mut receiver = AccountState::default();
    for r in new {
        receiver.apply(r);
    }
    let mut joined = receiver.clone();
    joined.join(&snapshot.state);
    assert_eq!(joined.view(), view, "seed {seed}: a snapshot joined into a log differs");
    let mut other_way = snapshot.state.clone();
    other_way.join(&receiver);
    assert_eq!(other_way.view(), view, "seed {seed}: join is not commutative");
    joined.join(&snapshot.state);
    assert_eq!(joined.view(), view, "seed {seed}: join is not idempotent");
    testkit::check_outcome(seed, &view, &records, &BTreeSet::new());
    // The shared INBOX has the larger UIDVALIDITY.
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
