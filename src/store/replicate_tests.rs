//! The apply side end to end: two stores with different node names, changes made through the
//! ordinary Store API on one or both, shipped with in-process `engine::Link` pairs until quiet;
//! the IMAP-visible state (names, UIDVALIDITY, UIDs, flags, keywords, counters, bodies byte for
//! byte) must then be the same on both.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::store::message::DeliveryTarget;
use crate::store::{encode, keys, ChangeId, FlagOp, Flags, SpecialUse, Store, VersionVector};
use crate::sync::engine::{Link, Msg, Replica};
use crate::sync::merge::{Body, Op, Record};
use crate::sync::replica::StoreReplica;

const USER: &str = "alice@example.org";

fn open_as(dir: &std::path::Path, node: &str) -> Arc<Store> {
    let mut tries = 0;
    loop {
        match Store::open(dir, node, 8 * 1024 * 1024) {
            Ok(store) => return Arc::new(store),
            Err(super::super::StoreError::Sled(sled::Error::Io(e)))
                if tries < 100 && e.to_string().contains("lock") =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open store: {e}"),
        }
    }
}

struct Pair {
    dirs: (tempfile::TempDir, tempfile::TempDir),
    a: StoreReplica,
    b: StoreReplica,
    la: Link,
    lb: Link,
}

fn pair() -> Pair {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = StoreReplica::new(open_as(da.path(), "node-a"));
    let b = StoreReplica::new(open_as(db.path(), "node-b"));
    Pair { a, b, la: Link::default(), lb: Link::default(), dirs: (da, db) }
}

impl Pair {
    fn a(&self) -> &Store {
        self.a.store()
    }
    fn b(&self) -> &Store {
        self.b.store()
    }

    /// Stops B cleanly (what it applied is synced) and opens it again: the merged state is
    /// rebuilt from `R`, held messages come back from their `L` keys.
    fn restart_b(&mut self) {
        self.b().sync_blocking().unwrap();
        let spare = tempfile::tempdir().unwrap();
        let old = std::mem::replace(&mut self.b, StoreReplica::new(open_as(spare.path(), "spare")));
        drop(old);
        self.b = StoreReplica::new(open_as(self.dirs.1.path(), "node-b"));
    }

    /// Connects both links and feeds messages back and forth until neither side has more to
    /// say; returns how many messages went over.
    fn exchange(&mut self) -> usize {
        self.a().sync_blocking().unwrap();
        self.b().sync_blocking().unwrap();
        let mut to_b: VecDeque<Msg> = self.la.connected(&self.a).into();
        let mut to_a: VecDeque<Msg> = self.lb.connected(&self.b).into();
        let mut n = 0;
        loop {
            if let Some(m) = to_b.pop_front() {
                n += 1;
                to_a.extend(self.lb.handle(m, &mut self.b).expect("b handles"));
                continue;
            }
            if let Some(m) = to_a.pop_front() {
                n += 1;
                to_b.extend(self.la.handle(m, &mut self.a).expect("a handles"));
                continue;
            }
            // Quiet: what was applied is durable (and so may be forwarded); anything left?
            self.a().sync_blocking().unwrap();
            self.b().sync_blocking().unwrap();
            to_b.extend(self.la.pump(&self.a));
            to_a.extend(self.lb.pump(&self.b));
            if to_a.is_empty() && to_b.is_empty() {
                return n;
            }
        }
    }
}

fn deliver(store: &Store, mailbox: &str, body: &[u8]) -> u32 {
    let mut w = store.blob_writer().unwrap();
    w.write(body).unwrap();
    let blob = w.finish().unwrap();
    let target = DeliveryTarget { address: USER, mailbox, seen: false };
    let stored = store.commit_message(blob, &[target], Flags::default(), &[], 1_700_000_000, 60).unwrap();
    stored[0].uid
}

fn acct(store: &Store) -> u32 {
    store.account_id(USER).unwrap().expect("account exists")
}

fn mbox(store: &Store, name: &str) -> u32 {
    store.mailbox_id(acct(store), name).unwrap().expect("mailbox exists")
}

/// What IMAP shows of an account: per mailbox name its UIDVALIDITY, attributes, counters and,
/// per UID, flags, keywords (sorted), internal date and the body bytes.
type Shown = BTreeMap<String, (u32, bool, Option<SpecialUse>, (u32, u32, u64), BTreeMap<u32, Message>)>;
type Message = (u8, Vec<String>, i64, i16, Vec<u8>);

fn shown(store: &Store) -> Shown {
    let acct = acct(store);
    let mut out = BTreeMap::new();
    for info in store.list_mailboxes(acct).unwrap() {
        let m = &info.mailbox;
        let mut messages = BTreeMap::new();
        for (uid, e) in store.entries(acct, info.id).unwrap() {
            let body = store.read_blob_bytes(&e.blob).unwrap().expect("body present");
            let mut keywords = e.keywords.clone();
            keywords.sort();
            messages.insert(uid, (e.flags.0, keywords, e.internal_date, e.tz_offset_minutes, body));
        }
        assert_eq!(store.uids(acct, info.id).unwrap(), messages.keys().copied().collect::<Vec<_>>(), "index");
        let counts = (m.messages, m.unseen, m.size);
        out.insert(m.name.clone(), (m.uidvalidity, m.subscribed, m.special_use, counts, messages));
    }
    out
}

/// Body references equal the entries naming them, on every store (docs/store.md invariant 5).
fn check_refs(store: &Store) {
    let acct = acct(store);
    let mut refs: BTreeMap<[u8; 32], u64> = BTreeMap::new();
    for info in store.list_mailboxes(acct).unwrap() {
        for (_, e) in store.entries(acct, info.id).unwrap() {
            *refs.entry(e.blob).or_default() += 1;
        }
    }
    // A held message's `L` key (UID 0) keeps a reference to its body.
    let mut bodies = BTreeMap::new();
    for r in store.replicated_records(acct).unwrap() {
        if let Op::Append { body, .. } | Op::Move { body, .. } = r.op {
            bodies.insert(r.id, body.blob);
        }
    }
    // Retention keeps pruned messages' bodies in the base snapshot.
    for (msg, _, body) in store.replication_base(acct).unwrap().state.message_facts() {
        bodies.insert(msg, body.blob);
    }
    for item in store.meta.scan_prefix(&keys::msg_at(acct, 0, 0)[..5]) {
        let (k, v) = item.unwrap();
        if v[4..] == [0, 0, 0, 0] {
            let (hlc, node) = keys::change_parts(&k);
            *refs.entry(bodies[&ChangeId { hlc, node }]).or_default() += 1;
        }
    }
    for (hash, n) in refs {
        assert_eq!(store.blob_meta(&hash).unwrap().unwrap().refs, n);
    }
}

fn converged(p: &Pair) -> Shown {
    let (a, b) = (shown(p.a()), shown(p.b()));
    assert_eq!(a, b);
    check_refs(p.a());
    check_refs(p.b());
    a
}

#[test]
fn one_way_everything_the_api_does() {
    let mut p = pair();
    let a = p.a.store().clone();
    for i in 0..4 {
        deliver(&a, "INBOX", format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes());
    }
    let acct_a = acct(&a);
    let inbox = mbox(&a, "INBOX");
    a.store_flags(acct_a, inbox, &[1, 2], FlagOp::Add, Flags::SEEN, &["$Work".to_string()]).unwrap();
    a.expunge(acct_a, inbox, &[3]).unwrap();
    let work = a.create_mailbox(acct_a, "Work", None).unwrap();
    a.create_mailbox(acct_a, "Tmp", None).unwrap();
    a.set_subscribed(acct_a, "Tmp", false).unwrap();
    a.copy_messages(acct_a, inbox, &[1, 2], work).unwrap();
    a.rename_mailbox(acct_a, "Work", "Projects").unwrap();
    let archive = mbox(&a, "Archive");
    a.move_messages(acct_a, inbox, &[4], archive).unwrap();
    // A large body: several chunks and several Blob frames.
    let big: Vec<u8> = (0..700_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    deliver(&a, "Sent", &big);
    assert!(p.exchange() > 0);
    let s = converged(&p);
    assert!(s.contains_key("Projects") && s.contains_key("Tmp") && !s.contains_key("Work"));
    assert_eq!(s["INBOX"].4.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s["Projects"].4.len(), 2);
    assert_eq!(s["Archive"].4.len(), 1);
    assert!(!s["Tmp"].1, "unsubscribed");
    assert_eq!(s["Sent"].4.values().next().unwrap().4, big);

    // Deleting a mailbox and more flag changes, in a second round.
    a.delete_mailbox(acct_a, "Tmp").unwrap();
    a.delete_mailbox(acct_a, "Projects").unwrap();
    a.store_flags(acct_a, inbox, &[1], FlagOp::Replace, Flags::FLAGGED, &[]).unwrap();
    p.exchange();
    let s = converged(&p);
    assert!(!s.contains_key("Tmp") && !s.contains_key("Projects"));
    assert_eq!(s["INBOX"].4[&1].0, Flags::FLAGGED.0);
    assert_eq!(s["INBOX"].4[&2].1, vec!["$Work".to_string()]);
    // The replicated copies released their bodies with the mailbox: only live bodies remain.
    let live = |s: &Store| s.blob_counts().unwrap().0;
    assert_eq!(live(p.a()), live(p.b()));
    // Anti-entropy's digest sees a store that drifted from its records.
    let b = p.b.store().clone();
    let digest = b.shown_digest(acct(&b)).unwrap();
    assert_eq!(digest, a.shown_digest(acct_a).unwrap());
    let (ab, ib) = (acct(&b), mbox(&b, "INBOX"));
    let mut e = b.entry(ab, ib, 2).unwrap().unwrap();
    e.flags = Flags::DRAFT;
    b.meta.insert(keys::entry(ab, ib, 2), encode(&e)).unwrap();
    assert_ne!(b.shown_digest(ab).unwrap(), digest);
}

#[test]
fn a_peer_behind_the_retention_horizon_gets_a_snapshot_and_keeps_its_own_changes() {
    let mut p = pair();
    let (a, b) = (p.a.store().clone(), p.b.store().clone());
    for i in 1..=4 {
        deliver(&a, "INBOX", format!("Subject: a{i}\r\n\r\n{i}\r\n").as_bytes());
    }
    p.exchange();
    converged(&p);
    let (aa, ab) = (acct(&a), acct(&b));
    // Apart: A expunges 1 and flags 2; B expunges 3, flags 4, creates a mailbox and takes mail.
    a.expunge(aa, mbox(&a, "INBOX"), &[1]).unwrap();
    a.store_flags(aa, mbox(&a, "INBOX"), &[2], FlagOp::Add, Flags::SEEN, &[]).unwrap();
    deliver(&a, "INBOX", b"Subject: a5\r\n\r\n5\r\n");
    b.expunge(ab, mbox(&b, "INBOX"), &[3]).unwrap();
    b.store_flags(ab, mbox(&b, "INBOX"), &[4], FlagOp::Add, Flags::FLAGGED, &[]).unwrap();
    b.create_mailbox(ab, "FromB", None).unwrap();
    deliver(&b, "FromB", b"Subject: b1\r\n\r\nb\r\n");
    b.sync_blocking().unwrap();
    // B's retention prunes everything it holds, its own unreplicated changes included: A can
    // no longer be sent those records, only B's snapshot.
    let before = shown(&b);
    let mut pruned = 0;
    loop {
        let n = b.prune_replicated(ab, u64::MAX).unwrap();
        pruned += n;
        if n == 0 {
            break;
        }
    }
    assert!(pruned > 10, "{pruned}");
    assert!(b.replicated_records(ab).unwrap().is_empty());
    let horizon = b.replication_horizon(ab).unwrap();
    assert_eq!(horizon, b.vector(ab).unwrap());
    assert_eq!(shown(&b), before, "pruning changes nothing shown");
    drop(b);
    p.restart_b();
    let b = p.b.store().clone();
    assert_eq!(shown(&b), before, "the base snapshot is what a restart rebuilds from");
    check_refs(&b);

    p.exchange();
    let s = converged(&p);
    assert!(a.replication_horizon(aa).unwrap().includes(&horizon), "A installed B's snapshot");
    let inbox = &s["INBOX"].4;
    assert_eq!(inbox.keys().copied().collect::<Vec<_>>(), vec![2, 4, 5], "both expunges hold");
    assert_eq!(inbox[&2].0, Flags::SEEN.0);
    assert_eq!(inbox[&4].0, Flags::FLAGGED.0);
    assert_eq!(s["FromB"].4.len(), 1, "B's own change reached A");
    // A later change on either side still flows as records after the horizon.
    b.store_flags(ab, mbox(&b, "INBOX"), &[5], FlagOp::Add, Flags::ANSWERED, &[]).unwrap();
    p.exchange();
    assert_eq!(converged(&p)["INBOX"].4[&5].0, Flags::ANSWERED.0);
}

#[test]
fn both_sides_pruned_while_apart_converge_with_every_change() {
    let mut p = pair();
    let (a, b) = (p.a.store().clone(), p.b.store().clone());
    for i in 1..=6 {
        deliver(&a, "INBOX", format!("Subject: a{i}\r\n\r\n{i}\r\n").as_bytes());
    }
    p.exchange();
    converged(&p);
    let (aa, ab) = (acct(&a), acct(&b));
    a.expunge(aa, mbox(&a, "INBOX"), &[1]).unwrap();
    a.store_flags(aa, mbox(&a, "INBOX"), &[2], FlagOp::Add, Flags::SEEN, &[]).unwrap();
    b.expunge(ab, mbox(&b, "INBOX"), &[3]).unwrap();
    b.store_flags(ab, mbox(&b, "INBOX"), &[4], FlagOp::Add, Flags::default(), &["urgent".to_string()]).unwrap();
    b.create_mailbox(ab, "Apart", None).unwrap();
    a.sync_blocking().unwrap();
    b.sync_blocking().unwrap();
    // Both prune part of what they did apart, then take mail that claims the same UIDs.
    a.prune_replicated(aa, u64::MAX).unwrap();
    b.prune_replicated(ab, u64::MAX).unwrap();
    for i in 7..=9 {
        deliver(&a, "INBOX", format!("Subject: a{i}\r\n\r\n{i}\r\n").as_bytes());
    }
    for i in 10..=11 {
        deliver(&b, "INBOX", format!("Subject: b{i}\r\n\r\n{i}\r\n").as_bytes());
    }
    p.exchange();
    // A (the allocator) numbers the four messages that claim 7 and 8 on both sides.
    let peer = p.la.peer_reports(USER).expect("b reported").clone();
    assert!(p.a.allocate(USER, &[&peer]));
    p.exchange();
    let s = converged(&p);
    let inbox = &s["INBOX"].4;
    assert_eq!(inbox.keys().copied().collect::<Vec<_>>(), vec![2, 4, 5, 6, 9, 10, 11, 12, 13]);
    assert_eq!(inbox[&2].0, Flags::SEEN.0);
    assert_eq!(inbox[&4].1, vec!["urgent".to_string()]);
    assert!(s.contains_key("Apart"));
}

#[test]
fn changes_on_both_sides_converge() {
    let mut p = pair();
    let (a, b) = (p.a.store().clone(), p.b.store().clone());
    deliver(&a, "INBOX", b"Subject: a1\r\n\r\n1\r\n");
    deliver(&a, "INBOX", b"Subject: a2\r\n\r\n2\r\n");
    p.exchange();
    converged(&p);
    let (aa, ab) = (acct(&a), acct(&b));
    // Concurrently: A flags 1 \Seen, B flags 1 \Flagged and expunges 2, both create mailboxes,
    // B renames Junk.
    a.store_flags(aa, mbox(&a, "INBOX"), &[1], FlagOp::Add, Flags::SEEN, &[]).unwrap();
    b.store_flags(ab, mbox(&b, "INBOX"), &[1], FlagOp::Add, Flags::FLAGGED, &[]).unwrap();
    b.expunge(ab, mbox(&b, "INBOX"), &[2]).unwrap();
    a.create_mailbox(aa, "FromA", None).unwrap();
    b.create_mailbox(ab, "FromB", None).unwrap();
    b.rename_mailbox(ab, "Junk", "Spam").unwrap();
    deliver(&b, "FromB", b"Subject: b1\r\n\r\nb\r\n");
    p.exchange();
    let s = converged(&p);
    assert_eq!(s["INBOX"].4.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(s["INBOX"].4[&1].0, Flags::SEEN.0 | Flags::FLAGGED.0);
    assert!(s.contains_key("FromA") && s.contains_key("FromB") && s.contains_key("Spam"));
    assert_eq!(s["FromB"].4.len(), 1);
}

#[test]
fn concurrent_appends_are_renumbered_by_the_allocator() {
    let mut p = pair();
    let (a, b) = (p.a.store().clone(), p.b.store().clone());
    deliver(&a, "INBOX", b"Subject: first\r\n\r\n1\r\n");
    p.exchange();
    converged(&p);
    // Both claim UID 2 for different messages.
    assert_eq!(deliver(&a, "INBOX", b"Subject: on a\r\n\r\na\r\n"), 2);
    assert_eq!(deliver(&b, "INBOX", b"Subject: on b\r\n\r\nb\r\n"), 2);
    let b_msg = b.message_id(acct(&b), mbox(&b, "INBOX"), 2).unwrap().unwrap();
    p.exchange();
    // The conflict: neither node shows UID 2 any more, both hold both messages.
    for s in [&a, &b] {
        assert_eq!(s.uids(acct(s), mbox(s, "INBOX")).unwrap(), vec![1]);
        let reports = s.replication_reports(acct(s)).unwrap();
        let inbox = crate::store::mailbox::default_mailbox_guid(USER, "INBOX");
        assert_eq!(reports[&inbox].held.len(), 2);
        assert_eq!(reports[&inbox].uidnext, 3);
        // The held messages keep their bodies (one was this node's own, expunged aside).
        check_refs(s);
        assert_eq!(s.blob_counts().unwrap().0, 3);
    }
    // A is the allocator: it numbers what it holds and what B reported.
    let peer = p.la.peer_reports(USER).expect("b reported").clone();
    assert!(p.a.allocate(USER, &[&peer]));
    // With B's report gone stale (it predates the assignment) the allocator would number
    // again; without it, nothing is left.
    assert!(!p.a.allocate(USER, &[]), "nothing left to number");
    p.exchange();
    let s = converged(&p);
    let uids: Vec<u32> = s["INBOX"].4.keys().copied().collect();
    assert_eq!(uids, vec![1, 3, 4], "UID 2 is never reused");
    // B's message now has a UID above 2 on both nodes, under its own id.
    let (ab, ib) = (acct(&b), mbox(&b, "INBOX"));
    let at = b.message_at(ab, b_msg).unwrap().expect("b's message shown");
    assert_eq!(at.0, ib);
    assert!(at.1 >= 3);
    assert!(b.replication_reports(ab).unwrap().values().all(|r| r.held.is_empty()));
}

#[test]
fn a_batch_applied_twice_changes_nothing() {
    let p = pair();
    let a = p.a.store();
    deliver(a, "INBOX", b"Subject: x\r\n\r\nx\r\n");
    a.store_flags(acct(a), mbox(a, "INBOX"), &[1], FlagOp::Add, Flags::SEEN, &[]).unwrap();
    a.sync_blocking().unwrap();
    let records = a.replicated_page(acct(a), &VersionVector::default(), 500).unwrap();
    assert!(!records.is_empty());
    let b = p.b.store();
    for r in &records {
        if let Op::Append { body, .. } = &r.op {
            let bytes = a.read_blob_bytes(&body.blob).unwrap().unwrap();
            assert!(b.write_blob(&body.blob, &bytes).unwrap());
        }
    }
    assert_eq!(b.apply_replicated(USER, &records).unwrap(), records.len());
    let once = (shown(b), b.vector(acct(b)).unwrap(), b.mailbox(acct(b), mbox(b, "INBOX")).unwrap());
    assert_eq!(b.apply_replicated(USER, &records).unwrap(), 0);
    assert_eq!(b.replication_reports(acct(b)).unwrap().values().map(|r| r.held.len()).sum::<usize>(), 0);
    let twice = (shown(b), b.vector(acct(b)).unwrap(), b.mailbox(acct(b), mbox(b, "INBOX")).unwrap());
    assert_eq!(once, twice);
    assert_eq!(shown(a), shown(b));
}

#[test]
fn only_durable_records_are_paged() {
    let p = pair();
    let a = p.a.store();
    deliver(a, "INBOX", b"Subject: x\r\n\r\nx\r\n");
    let acct_a = acct(a);
    assert!(a.replicated_page(acct_a, &VersionVector::default(), 500).unwrap().is_empty());
    a.sync_blocking().unwrap();
    let all = a.replicated_page(acct_a, &VersionVector::default(), 500).unwrap();
    assert!(!all.is_empty());
    let two = a.replicated_page(acct_a, &VersionVector::default(), 2).unwrap();
    assert_eq!(two[..], all[..2]);
}

#[test]
fn constructed_records_bodies_and_held_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_as(dir.path(), "node-b");
    let node = crate::store::node_id("node-x");
    let guid = [7u8; 16];
    let id = |hlc| ChangeId { hlc, node };
    let body = |bytes: &[u8]| Body {
        blob: *blake3::hash(bytes).as_bytes(),
        size: bytes.len() as u64,
        internal_date: 1_700_000_000,
        tz_offset_minutes: -300,
    };
    let (one, two) = (b"Subject: one\r\n\r\n1\r\n".as_slice(), b"Subject: two\r\n\r\n2\r\n".as_slice());
    let append =
        |uid, b: &[u8]| Op::Append { guid, uid: Some(uid), body: body(b), flags: Flags::SEEN, keywords: vec![] };
    let records = vec![
        Record {
            id: id(100 << 16),
            op: Op::MailboxCreate { guid, name: "Lists".into(), uidvalidity: 42, special_use: None },
        },
        Record { id: id(101 << 16), op: append(5, one) },
        Record { id: id(102 << 16), op: append(6, two) },
    ];
    assert_eq!(store.missing_blobs(&crate::sync::engine::bodies(&records)).unwrap().len(), 2);
    assert!(!store.write_blob(&body(one).blob, b"not it").unwrap());
    assert!(store.write_blob(&body(one).blob, one).unwrap());
    assert_eq!(store.missing_blobs(&crate::sync::engine::bodies(&records)).unwrap(), vec![body(two).blob]);
    assert_eq!(store.apply_replicated(USER, &records).unwrap(), 3);
    let acct = acct(&store);
    let lists = mbox(&store, "Lists");
    let m = store.mailbox(acct, lists).unwrap().unwrap();
    assert_eq!((m.uidvalidity, m.uidnext, m.messages), (42, 6, 1));
    let e = store.entry(acct, lists, 5).unwrap().unwrap();
    assert_eq!((e.flags, e.tz_offset_minutes), (Flags::SEEN, -300));
    assert_eq!(store.read_blob_bytes(&e.blob).unwrap().unwrap(), one);
    assert_eq!(store.blob_meta(&e.blob).unwrap().unwrap().refs, 1);
    // UID 6's body never came: not shown, and not reported for renumbering (its UID is fine).
    assert_eq!(store.uids(acct, lists).unwrap(), vec![5]);
    assert!(store.replication_reports(acct).unwrap()[&guid].held.is_empty());
    // Its body arrives: the next reconcile shows it at its UID (still at or above UIDNEXT).
    assert!(store.write_blob(&body(two).blob, two).unwrap());
    let flag = Record {
        id: id(103 << 16),
        op: Op::SetFlags {
            msg: id(101 << 16),
            set: vec![crate::sync::merge::FlagKey::Keyword("$x".into())],
            clear: vec![],
        },
    };
    store.apply_replicated(USER, &[flag]).unwrap();
    assert_eq!(store.uids(acct, lists).unwrap(), vec![5, 6]);
    assert_eq!(store.entry(acct, lists, 5).unwrap().unwrap().keywords, vec!["$x".to_string()]);
    // The remote HLC was observed: local changes now sort after the remote ones.
    store.create_mailbox(acct, "Mine", None).unwrap();
    let v = store.vector(acct).unwrap();
    assert!(v.get(crate::store::node_id("node-b")) > 103 << 16);
    // A fetched body nobody referenced is removed at the next open; a referenced one stays.
    let orphan = b"orphan body".as_slice();
    let orphan_hash = *blake3::hash(orphan).as_bytes();
    assert!(store.write_blob(&orphan_hash, orphan).unwrap());
    store.sync_blocking().unwrap();
    drop(store);
    let store = open_as(dir.path(), "node-b");
    assert!(store.blob_meta(&orphan_hash).unwrap().is_none());
    assert_eq!(store.read_blob_bytes(&body(one).blob).unwrap().unwrap(), one);
    assert_eq!(store.read_blob_bytes(&body(two).blob).unwrap().unwrap(), two);
    let (bodies, chunks) = store.blob_counts().unwrap();
    assert_eq!((bodies, chunks), (2, 2));
}

/// Per node, every UID each mailbox (by GUID and UIDVALIDITY) has shown and its message id.
type History = BTreeMap<(usize, [u8; 16], u32), BTreeMap<u32, crate::sync::merge::MsgId>>;

/// RFC 9051 §2.3.1.1: within one UIDVALIDITY a UID never names another message.
fn check_history(store: &Store, node: usize, history: &mut History) {
    let acct = acct(store);
    for info in store.list_mailboxes(acct).unwrap() {
        let guid = store.mailbox_guid(acct, info.id).unwrap().unwrap();
        let seen = history.entry((node, guid, info.mailbox.uidvalidity)).or_default();
        for uid in store.uids(acct, info.id).unwrap() {
            let Some(msg) = store.message_id(acct, info.id, uid).unwrap() else { continue };
            assert_eq!(*seen.entry(uid).or_insert(msg), msg, "node {node} reused UID {uid}");
            assert!(uid < info.mailbox.uidnext);
        }
    }
}

fn random_step(rng: &mut rand::rngs::StdRng, store: &Store, n: &mut u32) {
    use rand::Rng;
    const NAMES: [&str; 4] = ["INBOX", "Work", "Play", "Archive"];
    let acct = acct(store);
    let name = NAMES[rng.gen_range(0..NAMES.len())];
    let existing = store.mailbox_id(acct, name).unwrap();
    let some_uids = |mbox: u32, rng: &mut rand::rngs::StdRng| {
        let uids = store.uids(acct, mbox).unwrap();
        uids.into_iter().filter(|_| rng.gen_bool(0.4)).collect::<Vec<_>>()
    };
    match rng.gen_range(0..10) {
        0..=2 => {
            *n += 1;
            // A few bodies repeat, so content addressing and shared references are exercised.
            let body = format!("Subject: m{}\r\n\r\nbody\r\n", *n % 7);
            deliver(store, name, body.as_bytes());
        }
        3 | 4 => {
            if let Some(mbox) = existing {
                let uids = some_uids(mbox, rng);
                let op = [FlagOp::Add, FlagOp::Remove, FlagOp::Replace][rng.gen_range(0..3)];
                let flag = [Flags::SEEN, Flags::FLAGGED, Flags::DELETED][rng.gen_range(0..3)];
                let kw: Vec<String> = if rng.gen_bool(0.3) { vec!["$Label".into()] } else { vec![] };
                store.store_flags(acct, mbox, &uids, op, flag, &kw).unwrap();
            }
        }
        5 => {
            if let Some(mbox) = existing {
                let uids = some_uids(mbox, rng);
                store.expunge(acct, mbox, &uids).unwrap();
            }
        }
        6 => {
            let to = NAMES[rng.gen_range(0..NAMES.len())];
            if let (Some(from), Some(to)) = (existing, store.mailbox_id(acct, to).unwrap()) {
                let uids = some_uids(from, rng);
                if rng.gen_bool(0.5) {
                    store.copy_messages(acct, from, &uids, to).unwrap();
                } else {
                    store.move_messages(acct, from, &uids, to).unwrap();
                }
            }
        }
        7 => match existing {
            Some(_) if name != "INBOX" => store.delete_mailbox(acct, name).unwrap(),
            None => {
                store.create_mailbox(acct, name, None).unwrap();
            }
            _ => {}
        },
        8 => {
            let to = NAMES[rng.gen_range(0..NAMES.len())];
            if existing.is_some() && name != "INBOX" && store.mailbox_id(acct, to).unwrap().is_none() {
                store.rename_mailbox(acct, name, to).unwrap();
            }
        }
        _ => {
            if existing.is_some() {
                store.set_subscribed(acct, name, rng.gen_bool(0.5)).unwrap();
            }
        }
    }
}

#[test]
fn random_histories_on_two_nodes_converge() {
    use rand::{Rng, SeedableRng};
    for seed in 0..16u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = pair();
        deliver(p.a(), "INBOX", b"Subject: start\r\n\r\n0\r\n");
        p.exchange();
        let mut history = History::new();
        let mut n = 0;
        for _ in 0..100 {
            let store = if rng.gen_bool(0.5) { p.a() } else { p.b() };
            random_step(&mut rng, store, &mut n);
            if rng.gen_bool(0.2) {
                p.exchange();
                // Same records: the same digest of what clients see, holds put back in place.
                let (va, vb) = (p.a().vector(acct(p.a())).unwrap(), p.b().vector(acct(p.b())).unwrap());
                if va == vb {
                    let (da, db) = (p.a().shown_digest(acct(p.a())), p.b().shown_digest(acct(p.b())));
                    assert_eq!(da.unwrap(), db.unwrap(), "seed {seed}");
                }
            }
            if rng.gen_bool(0.03) {
                p.restart_b();
            }
            if rng.gen_bool(0.05) {
                // Retention on one side, up to a random record: the other side may then need
                // a snapshot, joined into what it did meanwhile.
                let store = if rng.gen_bool(0.5) { p.a() } else { p.b() };
                let acct = acct(store);
                store.sync_blocking().unwrap();
                let records = store.replicated_records(acct).unwrap();
                if !records.is_empty() {
                    let before = records[rng.gen_range(0..records.len())].id.hlc;
                    while store.prune_replicated(acct, before).unwrap() > 0 {}
                }
            }
            check_history(p.a(), 0, &mut history);
            check_history(p.b(), 1, &mut history);
        }
        let (a, b) = (p.a.store().clone(), p.b.store().clone());
        // Heal: exchange, and let A (the allocator) number what anyone holds, until quiet.
        p.exchange();
        for round in 0.. {
            assert!(round < 5, "seed {seed}: the allocator does not settle");
            let peer = p.la.peer_reports(USER).cloned().unwrap_or_default();
            if !p.a.allocate(USER, &[&peer]) {
                break;
            }
            p.exchange();
            check_history(&a, 0, &mut history);
            check_history(&b, 1, &mut history);
        }
        let (sa, sb) = (shown(&a), shown(&b));
        assert_eq!(sa, sb, "seed {seed}");
        check_refs(&a);
        check_refs(&b);
        for s in [&a, &b] {
            let held: usize = s.replication_reports(acct(s)).unwrap().values().map(|r| r.held.len()).sum();
            assert_eq!(held, 0, "seed {seed}: nothing stays held");
        }
        // Both show exactly the merged view (every message numbered, nothing hidden).
        let view = {
            let mut state = a.replication_base(acct(&a)).unwrap().state;
            for r in a.replicated_records(acct(&a)).unwrap() {
                state.apply(&r);
            }
            state.view()
        };
        for (guid, vb) in &view.mailboxes {
            assert!(vb.pending.is_empty(), "seed {seed}");
            let mbox = a.mailbox_by_guid(acct(&a), guid).unwrap().expect("view mailbox exists");
            let uids: Vec<u32> = vb.messages.keys().copied().collect();
            assert_eq!(a.uids(acct(&a), mbox).unwrap(), uids, "seed {seed}");
        }
        assert_eq!(view.mailboxes.len(), sa.len(), "seed {seed}");
        assert_eq!(a.shown_digest(acct(&a)).unwrap(), view.digest(), "seed {seed}");
        assert_eq!(b.shown_digest(acct(&b)).unwrap(), view.digest(), "seed {seed}");
    }
}

/// `cargo test --release --lib store::replicate::tests::apply_cost -- --ignored --nocapture`:
/// what a reconcile costs as an account grows (each batch computes the whole view).
#[test]
#[ignore]
fn apply_cost() {
    let mut p = pair();
    let total: usize = 5000;
    let start = std::time::Instant::now();
    let a = p.a.store().clone();
    for i in 0..total {
        deliver(&a, "INBOX", format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes());
    }
    println!("{total} deliveries on A: {:?}", start.elapsed());
    let start = std::time::Instant::now();
    p.exchange();
    let batches = total.div_ceil(crate::sync::engine::BATCH);
    println!("shipping and applying {total} messages ({batches} batches) on B: {:?}", start.elapsed());
    let (ab, ib) = (acct(p.b()), mbox(p.b(), "INBOX"));
    let rounds: u32 = 20;
    let mut spent = std::time::Duration::ZERO;
    for uid in 1..=rounds {
        a.store_flags(acct(&a), mbox(&a, "INBOX"), &[uid], FlagOp::Add, Flags::SEEN, &[]).unwrap();
        a.sync_blocking().unwrap();
        let records = a.replicated_page(acct(&a), &p.b().vector(ab).unwrap(), 500).unwrap();
        let start = std::time::Instant::now();
        assert_eq!(p.b().apply_replicated(USER, &records).unwrap(), 1);
        spent += start.elapsed();
    }
    println!("apply_replicated of one flag change on B with {total} messages: {:?}", spent / rounds);
    assert_eq!(p.b().uids(ab, ib).unwrap().len(), total);
}
