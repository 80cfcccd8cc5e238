//! The engine over a simulated network (plan §6.1): two or three nodes, random user actions,
//! connections that break and come back, partitions, messages delayed, nodes that crash and lose
//! what they had not made durable, and skewed clocks. After healing and quiescence every node
//! must hold the same state (I5) with the same UIDs, no acknowledged message may be lost (I1),
//! and the observers check I2–I4 at every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::store::ChangeId;
use crate::sync::merge::{AccountState, Guid, MsgId, Op, Snapshot};
use crate::sync::projection::Report;
use crate::sync::testkit::{self, Observer};

const ACCOUNT: &str = "alice@example.org";

/// An in-memory replica with crash semantics: what was applied after the last `sync` is lost.
/// Bodies are kept as soon as they arrive, like the store's chunk tree.
#[derive(Default)]
struct Mem {
    id: u32,
    hlc: u64,
    skew: i64,
    /// The simulated wall clock, in steps.
    now: u64,
    log: Vec<Record>,
    durable: usize,
    /// What retention pruned, and snapshots installed: durable as soon as written.
    base: Snapshot,
    /// Every record this node pruned (for the final checks, which need the whole history).
    pruned: Vec<Record>,
    installs: usize,
    state: AccountState,
    vector: VersionVector,
    blobs: BTreeMap<Hash, Vec<u8>>,
    obs: Observer,
}

/// A body's content is a function of its hash in this simulation.
fn content(hash: &Hash) -> Vec<u8> {
    hash.repeat(3)
}

fn bodies(records: &[Record]) -> impl Iterator<Item = Hash> + '_ {
    records.iter().filter_map(|r| match &r.op {
        Op::Append { body, .. } | Op::Move { body, .. } => Some(body.blob),
        _ => None,
    })
}

impl Mem {
    fn commit(&mut self, op: Op) -> ChangeId {
        let physical = ((self.now as i64 * 100 + self.skew).max(0) as u64) << 16;
        self.hlc = physical.max(self.hlc + 1);
        let id = ChangeId { hlc: self.hlc, node: self.id };
        let record = Record { id, op };
        for hash in bodies(std::slice::from_ref(&record)) {
            self.blobs.insert(hash, content(&hash));
        }
        self.apply(ACCOUNT, &[record]);
        id
    }

    fn crash(&mut self) {
        self.log.truncate(self.durable);
        self.state = self.base.state.clone();
        self.vector = self.base.vector.clone();
        for r in &self.log {
            self.state.apply(r);
            self.vector.advance(r.id);
        }
        // What clients were shown is not forgotten: the projection stays as conservative as it was.
        self.obs.observe(self.id, &self.state.view());
    }
}

impl Mem {
    /// Retention: folds the durable records older than `before` into the base.
    fn prune(&mut self, before: u64) {
        let (old, keep): (Vec<Record>, Vec<Record>) =
            self.log[..self.durable].iter().cloned().partition(|r| r.id.hlc < before);
        if old.is_empty() {
            return;
        }
        for r in &old {
            self.base.absorb(r);
        }
        self.base.state.compact();
        let rest = self.log.split_off(self.durable);
        self.durable = keep.len();
        self.log = keep;
        self.log.extend(rest);
        self.pruned.extend(old);
    }
}

impl Replica for Mem {
    fn accounts(&self) -> Vec<String> {
        vec![ACCOUNT.to_string()]
    }
    fn vector(&self, _: &str) -> VersionVector {
        self.vector.clone()
    }
    fn page(&self, _: &str, after: &VersionVector, limit: usize) -> Vec<Record> {
        let mut out: Vec<Record> = self.log[..self.durable].iter().filter(|r| !after.covers(r.id)).cloned().collect();
        out.sort_by_key(|r| r.id);
        out.truncate(limit);
        out
    }
    fn missing_blobs(&self, hashes: &[Hash]) -> Vec<Hash> {
        hashes.iter().filter(|h| !self.blobs.contains_key(*h)).copied().collect()
    }
    fn read_blob(&self, hash: &Hash) -> Option<Vec<u8>> {
        self.blobs.get(hash).cloned()
    }
    fn write_blob(&mut self, hash: &Hash, bytes: &[u8]) -> bool {
        if bytes != content(hash) {
            return false;
        }
        self.blobs.insert(*hash, bytes.to_vec());
        true
    }
    fn apply(&mut self, _: &str, records: &[Record]) {
        for r in records {
            if !self.vector.covers(r.id) {
                self.hlc = self.hlc.max(r.id.hlc); // Hlc::observe
                self.vector.advance(r.id);
                self.state.apply(r);
                self.log.push(r.clone());
            }
        }
        self.obs.observe(self.id, &self.state.view());
    }
    fn sync(&mut self) {
        self.durable = self.log.len();
    }
    fn reports(&self, _: &str) -> BTreeMap<Guid, Report> {
        self.obs.report.clone()
    }
    fn digest(&self, _: &str) -> [u8; 32] {
        self.state.view().digest()
    }
    fn repair(&mut self, _: &str) -> bool {
        false
    }
    fn horizon(&self, _: &str) -> VersionVector {
        self.base.vector.clone()
    }
    fn snapshot(&self, _: &str) -> Vec<u8> {
        postcard::to_allocvec(&self.base).expect("encodes")
    }
    fn install(&mut self, _: &str, snapshot: &Snapshot) {
        if let Some(max) = snapshot.vector.iter().map(|(_, h)| h).max() {
            self.hlc = self.hlc.max(max); // Hlc::observe
        }
        self.installs += 1;
        self.base.join(snapshot);
        self.base.state.compact();
        self.state.join(&snapshot.state);
        self.vector.join(&snapshot.vector);
        self.obs.observe(self.id, &self.state.view());
    }
    fn allocate(&mut self, _: &str, peer_reports: &[&BTreeMap<Guid, Report>]) -> bool {
        let view = self.state.view();
        let own = self.obs.report.clone();
        let reports = peer_reports.iter().copied().chain(std::iter::once(&own));
        let Some(op) = crate::sync::projection::allocation(&view, reports) else { return false };
        self.commit(op);
        self.sync();
        true
    }
}

struct Node {
    mem: Mem,
    /// One link per other node (by index).
    links: Vec<Link>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    nodes: Vec<Node>,
    /// (from, to) → frames in flight with the step they arrive at; FIFO like TCP.
    wire: BTreeMap<(usize, usize), VecDeque<(u64, Msg)>>,
    /// Unordered pairs with a live connection.
    up: BTreeSet<(usize, usize)>,
    /// Unordered pairs that cannot connect.
    cut: BTreeSet<(usize, usize)>,
    /// Deliveries answered as durable (SMTP's 250).
    acked: BTreeSet<MsgId>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = (0..n)
            .map(|i| Node {
                mem: Mem { id: 100 + i as u32, skew: rng.gen_range(-50..50), ..Mem::default() },
                links: (0..n).map(|_| Link::default()).collect(),
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: 0,
            nodes,
            wire: BTreeMap::new(),
            up: BTreeSet::new(),
            cut: BTreeSet::new(),
            acked: BTreeSet::new(),
        };
        for i in 0..n {
            sim.commit(i, testkit::create_inbox(10 + i as u32));
            sim.nodes[i].mem.sync();
        }
        sim
    }

    fn commit(&mut self, i: usize, op: Op) -> ChangeId {
        self.nodes[i].mem.now = self.now;
        self.nodes[i].mem.commit(op)
    }

    fn send(&mut self, from: usize, to: usize, msgs: Vec<Msg>) {
        let now = self.now;
        let delay = self.rng.gen_range(0..4);
        let q = self.wire.entry((from, to)).or_default();
        let at = q.back().map_or(0, |(t, _)| *t).max(now + delay);
        q.extend(msgs.into_iter().map(|m| (at, m)));
    }

    fn pump_all(&mut self) {
        for i in 0..self.nodes.len() {
            for j in 0..self.nodes.len() {
                if i != j && self.up.contains(&pair(i, j)) {
                    let node = &mut self.nodes[i];
                    let msgs = node.links[j].pump(&node.mem);
                    self.send(i, j, msgs);
                }
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        if a == b || self.cut.contains(&pair(a, b)) || !self.up.insert(pair(a, b)) {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            let node = &mut self.nodes[x];
            let msgs = node.links[y].connected(&node.mem);
            self.send(x, y, msgs);
        }
    }

    fn break_link(&mut self, a: usize, b: usize) {
        self.up.remove(&pair(a, b));
        for (x, y) in [(a, b), (b, a)] {
            self.nodes[x].links[y].disconnected();
            self.wire.remove(&(x, y));
        }
    }

    /// Delivers the next frame of one connection, if it has arrived.
    fn deliver_one(&mut self, ignore_time: bool) -> bool {
        let now = self.now;
        let ready: Vec<(usize, usize)> = self
            .wire
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(t, _)| ignore_time || *t <= now))
            .map(|(k, _)| *k)
            .collect();
        if ready.is_empty() {
            return false;
        }
        let (from, to) = ready[self.rng.gen_range(0..ready.len())];
        let Some((_, msg)) = self.wire.get_mut(&(from, to)).and_then(|q| q.pop_front()) else { return false };
        let node = &mut self.nodes[to];
        node.mem.now = now;
        match node.links[from].handle(msg, &mut node.mem) {
            Ok(replies) => self.send(to, from, replies),
            Err(e) => panic!("protocol error between well-behaved nodes: {e:?}"),
        }
        if to == 0 {
            self.allocate();
        }
        true
    }

    /// Node 0 is the allocator; it knows what its peers reported in their acks.
    fn allocate(&mut self) -> bool {
        let node = &mut self.nodes[0];
        let reports: Vec<&BTreeMap<Guid, Report>> = node.links.iter().filter_map(|l| l.peer_reports(ACCOUNT)).collect();
        node.mem.now = self.now;
        node.mem.allocate(ACCOUNT, &reports)
    }

    fn step(&mut self) {
        self.now += 1;
        let n = self.nodes.len();
        let (a, b) = (self.rng.gen_range(0..n), self.rng.gen_range(0..n));
        match self.rng.gen_range(0..100) {
            0..=39 => {
                let view = self.nodes[a].mem.state.view();
                let seen = self.nodes[a].mem.vector.clone();
                if let Some(op) = testkit::random_op(&mut self.rng, &view, &seen) {
                    let is_append = matches!(op, Op::Append { .. } | Op::Move { .. });
                    let id = self.commit(a, op);
                    if is_append && self.rng.gen_bool(0.5) {
                        // A delivery: answered only once durable.
                        self.nodes[a].mem.sync();
                        self.acked.insert(id);
                    }
                }
            }
            40..=74 => {
                self.deliver_one(false);
            }
            75..=81 => self.nodes[a].mem.sync(),
            82..=85 => self.break_link(a, b),
            86..=92 => self.connect(a, b),
            93..=95 => {
                let p = pair(a, b);
                if a != b && !self.cut.remove(&p) {
                    self.cut.insert(p);
                    self.break_link(a, b);
                }
            }
            96..=97 => {
                self.nodes[a].mem.crash();
                for j in 0..n {
                    if j != a {
                        self.break_link(a, j);
                    }
                }
            }
            98 => {
                // Retention: a horizon a few dozen steps back, so a node cut off or crashed
                // for longer gets a snapshot.
                let age = self.rng.gen_range(5..60);
                let before = (self.now.saturating_sub(age) * 100) << 16;
                self.nodes[a].mem.prune(before);
            }
            _ => {
                self.allocate();
            }
        }
        self.pump_all();
    }

    /// Heals every partition and runs the network dry, with the allocator at work, until no
    /// frame is in flight and nothing is left to number.
    fn settle(&mut self, seed: u64) {
        self.cut.clear();
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                self.connect(a, b);
            }
        }
        for _round in 0..30 {
            let mut budget = 100_000;
            loop {
                self.pump_all();
                if !self.deliver_one(true) {
                    break;
                }
                budget -= 1;
                assert!(budget > 0, "seed {seed}: the network never went quiet");
            }
            for node in &mut self.nodes {
                node.mem.sync();
            }
            self.pump_all();
            if self.wire.values().all(|q| q.is_empty()) && !self.allocate() {
                return;
            }
        }
        panic!("seed {seed}: no quiescence after 30 rounds");
    }
}

/// Runs one seed; returns how many snapshots were installed.
fn run_seed(seed: u64, n: usize, steps: usize) -> usize {
    let mut sim = Sim::new(seed, n);
    for _ in 0..steps {
        sim.step();
    }
    sim.settle(seed);
    let view = sim.nodes[0].mem.state.view();
    for node in &sim.nodes[1..] {
        assert_eq!(node.mem.state.view(), view, "seed {seed}: node {} differs (I5)", node.mem.id);
        assert_eq!(node.mem.vector, sim.nodes[0].mem.vector, "seed {seed}: vectors differ");
    }
    testkit::check_numbering(seed, &view, sim.nodes.iter().map(|n| &n.mem.obs));
    // Every node holds the body of every message it shows.
    for node in &sim.nodes {
        for b in view.mailboxes.values() {
            for (_, m) in b.messages.values() {
                assert!(node.mem.blobs.contains_key(&m.blob), "seed {seed}: node {} lacks a body", node.mem.id);
            }
        }
    }
    // The whole history: what every node pruned or still logs.
    let mut history: BTreeMap<ChangeId, Record> = BTreeMap::new();
    for node in &sim.nodes {
        history.extend(node.mem.pruned.iter().chain(&node.mem.log).map(|r| (r.id, r.clone())));
    }
    let history: Vec<Record> = history.into_values().collect();
    testkit::check_outcome(seed, &view, &history, &sim.acked);
    // Anti-entropy ran over every link once everything was acknowledged, and found no
    // difference.
    for node in &sim.nodes {
        for (j, link) in node.links.iter().enumerate() {
            if j != node.mem.id as usize - 100 {
                let a = link.audits();
                assert_eq!((a.differ, a.repaired), (0, 0), "seed {seed}: anomalies {a:?}");
                assert!(a.equal > 0, "seed {seed}: no anti-entropy comparison ran");
            }
        }
    }
    // Every peer acknowledged everything durable (what durable-ack waits for).
    for (i, node) in sim.nodes.iter().enumerate() {
        for (j, link) in node.links.iter().enumerate() {
            if i != j {
                assert_eq!(link.acked(ACCOUNT), Some(&sim.nodes[j].mem.vector), "seed {seed}: ack state");
            }
        }
    }
    sim.nodes.iter().map(|n| n.mem.installs).sum()
}

#[test]
fn two_nodes_converge_through_faults() {
    let seeds: u64 = std::env::var("POSTERN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let installs: usize = (0..seeds).map(|seed| run_seed(seed, 2, 300)).sum();
    // Retention must really have cut some node off from records it lacked.
    assert!(installs * 10 >= seeds as usize, "only {installs} snapshots over {seeds} seeds");
}

#[test]
fn three_nodes_converge_through_faults() {
    let seeds: u64 = std::env::var("POSTERN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let installs: usize = (10_000..10_000 + seeds).map(|seed| run_seed(seed, 3, 400)).sum();
    assert!(installs * 10 >= seeds as usize, "only {installs} snapshots over {seeds} seeds");
}

fn ok(r: Result<Vec<Msg>, ProtocolError>) -> Vec<Msg> {
    r.expect("no protocol error")
}

#[test]
fn a_gap_restarts_the_pusher_from_the_receivers_vector() {
    let mut a = Mem::default();
    let mut b = Mem::default();
    let rec = |hlc| Record { id: ChangeId { hlc, node: 1 }, op: testkit::create_inbox(hlc as u32) };
    a.apply(ACCOUNT, &[rec(1), rec(2), rec(3)]);
    a.sync();
    let (mut la, mut lb) = (Link::default(), Link::default());
    // b claims to hold up to 2 (it lied, or lost it in a crash): the batch starts after 2.
    let claim = VersionVector([(1, 2)].into_iter().collect());
    let batch = ok(la.handle(Msg::Vectors { accounts: vec![(ACCOUNT.into(), claim)] }, &mut a));
    assert!(matches!(&batch[..], [Msg::Batch { records, .. }] if records.len() == 1));
    let reply = ok(lb.handle(batch[0].clone(), &mut b));
    assert!(matches!(&reply[..], [Msg::Gap { .. }]), "{reply:?}");
    assert!(b.log.is_empty(), "nothing applied across a hole");
    let resend = ok(la.handle(reply[0].clone(), &mut a));
    let ack = ok(lb.handle(resend[0].clone(), &mut b));
    assert!(matches!(&ack[..], [Msg::Ack { .. }]));
    assert_eq!(b.vector, a.vector);
    assert_eq!(ok(lb.handle(resend[0].clone(), &mut b)).len(), 1, "a duplicate is acked again");
    assert_eq!(b.log.len(), 3, "and applied once");
}

fn append(hlc: u64, blob: u8) -> Record {
    let body = crate::sync::merge::Body { blob: [blob; 32], size: 96, internal_date: 0, tz_offset_minutes: 0 };
    let op =
        Op::Append { guid: testkit::inbox(), uid: Some(hlc as u32), body, flags: Default::default(), keywords: vec![] };
    Record { id: ChangeId { hlc, node: 1 }, op }
}

#[test]
fn bodies_travel_once_and_are_checked() {
    let mut a = Mem::default();
    a.apply(ACCOUNT, &[Record { id: ChangeId { hlc: 1, node: 1 }, op: testkit::create_inbox(1) }, append(2, 7)]);
    a.blobs.insert([7; 32], content(&[7; 32]));
    a.sync();
    let mut b = Mem::default();
    let (mut la, mut lb) = (Link::default(), Link::default());
    let batch = ok(la.handle(Msg::Vectors { accounts: vec![] }, &mut a));
    let fetch = ok(lb.handle(batch[0].clone(), &mut b));
    assert_eq!(fetch, vec![Msg::Fetch { hashes: vec![[7; 32]] }]);
    assert!(b.log.is_empty(), "not applied before its body is here");
    let blobs = ok(la.handle(fetch[0].clone(), &mut a));
    assert!(matches!(&blobs[..], [Msg::Blob { last: true, missing: false, .. }]));

    // A body that does not match its hash ends the connection.
    let mut bad = blobs[0].clone();
    if let Msg::Blob { bytes, .. } = &mut bad {
        bytes[0] ^= 1;
    }
    assert!(lb.clone().handle(bad, &mut b).is_err());
    // A body nobody asked for too.
    let unasked = Msg::Blob { hash: [9; 32], offset: 0, last: true, missing: false, bytes: content(&[9; 32]) };
    assert!(lb.clone().handle(unasked, &mut b).is_err());

    let ack = ok(lb.handle(blobs[0].clone(), &mut b));
    assert!(matches!(&ack[..], [Msg::Ack { .. }]));
    assert_eq!(b.state.view(), a.state.view());
    // Next time the body is there: no fetch.
    let mut c = Mem::default();
    c.blobs.insert([7; 32], content(&[7; 32]));
    let mut lc = Link::default();
    assert!(matches!(&ok(lc.handle(batch[0].clone(), &mut c))[..], [Msg::Ack { .. }]));
}

#[test]
fn a_body_the_pusher_no_longer_has_does_not_stall_the_link() {
    let mut a = Mem::default();
    a.apply(ACCOUNT, &[Record { id: ChangeId { hlc: 1, node: 1 }, op: testkit::create_inbox(1) }, append(2, 7)]);
    a.sync(); // the body was deleted there (its message expunged since)
    let mut b = Mem::default();
    let (mut la, mut lb) = (Link::default(), Link::default());
    let batch = ok(la.handle(Msg::Vectors { accounts: vec![] }, &mut a));
    let fetch = ok(lb.handle(batch[0].clone(), &mut b));
    let blobs = ok(la.handle(fetch[0].clone(), &mut a));
    assert!(matches!(&blobs[..], [Msg::Blob { missing: true, .. }]));
    let ack = ok(lb.handle(blobs[0].clone(), &mut b));
    assert!(matches!(&ack[..], [Msg::Ack { .. }]), "{ack:?}");
    assert_eq!(b.vector, a.vector);
}

#[test]
fn anti_entropy_finds_a_state_that_differs_under_equal_vectors() {
    let mut a = Mem::default();
    let mut b = Mem::default();
    let inbox = Record { id: ChangeId { hlc: 1, node: 1 }, op: testkit::create_inbox(1) };
    for m in [&mut a, &mut b] {
        m.apply(ACCOUNT, std::slice::from_ref(&inbox));
        m.sync();
    }
    let (mut la, mut lb) = (Link::default(), Link::default());
    let vectors = ok(lb.connected(&b).into_iter().next().map(|v| la.handle(v, &mut a)).unwrap());
    assert!(matches!(&vectors[..], [Msg::Digest { .. }]), "{vectors:?}");
    let verdict = ok(lb.handle(vectors[0].clone(), &mut b));
    assert_eq!(verdict, vec![Msg::Audited { account: ACCOUNT.into(), outcome: Audit::Equal }]);
    ok(la.handle(verdict[0].clone(), &mut a));
    assert_eq!(la.audits().equal, 1);

    // B's state changes without its vector (a bug): the next pass reports it.
    b.state.apply(&append(2, 7));
    la.audit_all(&a);
    let digest = la.pump(&a);
    let verdict = ok(lb.handle(digest[0].clone(), &mut b));
    assert_eq!(verdict, vec![Msg::Audited { account: ACCOUNT.into(), outcome: Audit::Differ }]);
    ok(la.handle(verdict[0].clone(), &mut a));
    assert_eq!(la.audits().differ, 1);
}
