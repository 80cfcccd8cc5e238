//! Store invariants under random operation sequences (proptest): UIDs strictly increase and are
//! never reused within a UIDVALIDITY, modseq strictly increases, bodies are stored once and
//! counted exactly, and a reopened store holds what was synced.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::sync::merge;

fn open(dir: &std::path::Path) -> Store {
    open_as(dir, "test-node")
}

/// Opens a store, waiting out the lock of one just dropped: sled's I/O pool can still hold the
/// file for a moment after the last handle goes.
fn open_as(dir: &std::path::Path, node: &str) -> Store {
    let mut tries = 0;
    loop {
        match Store::open(dir, node, 8 * 1024 * 1024) {
            Ok(store) => return store,
            Err(StoreError::Sled(sled::Error::Io(e))) if tries < 100 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open store: {e}"),
        }
    }
}

fn put(store: &Store, body: &[u8]) -> PendingBlob {
    let mut w = store.blob_writer().unwrap();
    // Write in uneven pieces to exercise chunk boundaries.
    for piece in body.chunks(7919) {
        w.write(piece).unwrap();
    }
    w.finish().unwrap()
}

fn body_of(store: &Store, hash: &[u8; 32]) -> Vec<u8> {
    store.read_blob_bytes(hash).unwrap().expect("body present")
}

#[derive(Debug, Clone)]
enum Op {
    Deliver { body: u8, users: Vec<u8>, mailbox: u8 },
    Flag { user: u8, mailbox: u8, pick: u16, mode: u8, keyword: u8 },
    Expunge { user: u8, mailbox: u8, pick: u16 },
    DeleteMailbox { user: u8, mailbox: u8 },
    Rename { user: u8, mailbox: u8 },
    Transfer { user: u8, from: u8, to: u8, pick: u16, remove: bool },
    Subscribe { user: u8, mailbox: u8, on: bool },
}

const USERS: [&str; 3] = ["a@example.org", "b@example.org", "c@example.org"];
const MAILBOXES: [&str; 3] = ["INBOX", "Work", "Archive"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, proptest::collection::vec(0u8..3, 1..4), 0u8..3)
            .prop_map(|(body, users, mailbox)| Op::Deliver { body, users, mailbox }),
        2 => (0u8..3, 0u8..3, any::<u16>(), 0u8..3, 0u8..4)
            .prop_map(|(user, mailbox, pick, mode, keyword)| Op::Flag { user, mailbox, pick, mode, keyword }),
        2 => (0u8..3, 0u8..3, any::<u16>()).prop_map(|(user, mailbox, pick)| Op::Expunge { user, mailbox, pick }),
        1 => (0u8..3, 1u8..3).prop_map(|(user, mailbox)| Op::DeleteMailbox { user, mailbox }),
        1 => (0u8..3, 1u8..3).prop_map(|(user, mailbox)| Op::Rename { user, mailbox }),
        1 => (0u8..3, 0u8..3, 0u8..3, any::<u16>(), any::<bool>())
            .prop_map(|(user, from, to, pick, remove)| Op::Transfer { user, from, to, pick, remove }),
        1 => (0u8..3, 0u8..3, any::<bool>()).prop_map(|(user, mailbox, on)| Op::Subscribe { user, mailbox, on }),
    ]
}

fn body(n: u8) -> Vec<u8> {
    // Body 5 spans several chunks.
    let len = if n == 5 { CHUNK_SIZE * 2 + 17 } else { 100 + n as usize };
    let mut b = format!("Subject: {n}\r\n\r\n").into_bytes();
    b.extend((0..len).map(|i| b'a' + ((i * 7 + n as usize) % 26) as u8));
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..60), page_records in 1usize..6, page_bytes in 0usize..1000) {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // (user, mailbox, uidvalidity) -> every uid ever handed out, with the hash it named.
        let mut seen_uids: HashMap<(String, String, u32), BTreeMap<u32, [u8; 32]>> = HashMap::new();
        let mut last_modseq: HashMap<(u32, u32), u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Deliver { body: b, users, mailbox } => {
                    let bytes = body(b);
                    let pending = put(&store, &bytes);
                    let targets: Vec<_> = users.iter()
                        .map(|u| DeliveryTarget { address: USERS[*u as usize], mailbox: MAILBOXES[mailbox as usize], seen: false })
                        .collect();
                    let stored = store.commit_message(pending, &targets, Flags::default(), &[], 0, 0).unwrap();
                    let distinct: HashSet<_> = users.iter().collect();
                    prop_assert_eq!(stored.len(), distinct.len());
                    for s in stored {
                        let key = (s.address.clone(), MAILBOXES[mailbox as usize].to_string(), s.uidvalidity);
                        let uids = seen_uids.entry(key).or_default();
                        // Strictly increasing and never reused.
                        prop_assert!(uids.keys().next_back().is_none_or(|&last| s.uid > last));
                        let e = store.entry(s.account, s.mailbox, s.uid).unwrap().unwrap();
                        uids.insert(s.uid, e.blob);
                        prop_assert_eq!(body_of(&store, &e.blob), bytes.clone());
                    }
                }
                Op::Flag { user, mailbox, pick, mode, keyword } => {
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let Some(mb) = store.mailbox_id(acct, MAILBOXES[mailbox as usize]).unwrap() else { continue };
                    let uids = store.uids(acct, mb).unwrap();
                    if uids.is_empty() { continue; }
                    let uid = uids[pick as usize % uids.len()];
                    let op = [FlagOp::Add, FlagOp::Remove, FlagOp::Replace][mode as usize];
                    // Keywords differing only in case: the store matches them case-insensitively.
                    let keywords: Vec<String> = ["$Label1", "$label1", "Work", "$Label2"][..=keyword as usize]
                        .iter().skip(keyword as usize / 2).map(|k| k.to_string()).collect();
                    let flags = if keyword % 2 == 0 { Flags::SEEN } else { Flags::SEEN.union(Flags::FLAGGED) };
                    store.store_flags(acct, mb, &[uid], op, flags, &keywords).unwrap();
                }
                Op::Expunge { user, mailbox, pick } => {
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let Some(mb) = store.mailbox_id(acct, MAILBOXES[mailbox as usize]).unwrap() else { continue };
                    let uids = store.uids(acct, mb).unwrap();
                    if uids.is_empty() { continue; }
                    let uid = uids[pick as usize % uids.len()];
                    prop_assert_eq!(store.expunge(acct, mb, &[uid]).unwrap(), vec![uid]);
                    prop_assert!(store.expunged_since(acct, mb, 0).unwrap().contains(&uid));
                }
                Op::DeleteMailbox { user, mailbox } => {
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let _ = store.delete_mailbox(acct, MAILBOXES[mailbox as usize]);
                }
                Op::Rename { user, mailbox } => {
                    // Work <-> Archive, when the other name is free: the mailbox keeps its GUID.
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let (from, to) = (MAILBOXES[mailbox as usize], MAILBOXES[3 - mailbox as usize]);
                    let Some(id) = store.mailbox_id(acct, from).unwrap() else { continue };
                    let guid = store.mailbox_guid(acct, id).unwrap();
                    if store.rename_mailbox(acct, from, to).is_ok() {
                        prop_assert_eq!(store.mailbox_id(acct, to).unwrap(), Some(id));
                        prop_assert_eq!(store.mailbox_guid(acct, id).unwrap(), guid);
                    }
                }
                Op::Transfer { user, from, to, pick, remove } => {
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let Some(src) = store.mailbox_id(acct, MAILBOXES[from as usize]).unwrap() else { continue };
                    let Some(dst) = store.mailbox_id(acct, MAILBOXES[to as usize]).unwrap() else { continue };
                    let uids = store.uids(acct, src).unwrap();
                    // Up to two messages, from a pick-dependent offset.
                    let picked: Vec<u32> = uids.iter().cycle().skip(pick as usize).take(uids.len().min(2)).copied().collect();
                    let pairs = if remove {
                        store.move_messages(acct, src, &picked, dst).unwrap()
                    } else {
                        store.copy_messages(acct, src, &picked, dst).unwrap()
                    };
                    prop_assert_eq!(pairs.len(), picked.iter().collect::<HashSet<_>>().len());
                }
                Op::Subscribe { user, mailbox, on } => {
                    let Some(acct) = store.account_id(USERS[user as usize]).unwrap() else { continue };
                    let _ = store.set_subscribed(acct, MAILBOXES[mailbox as usize], on);
                }
            }
            // After every step: modseq never decreases, counters match, bodies are counted exactly.
            let mut refs: HashMap<[u8; 32], u64> = HashMap::new();
            for user in USERS {
                let Some(acct) = store.account_id(user).unwrap() else { continue };
                for info in store.list_mailboxes(acct).unwrap() {
                    let entries = store.entries(acct, info.id).unwrap();
                    let m = &info.mailbox;
                    let prev = last_modseq.insert((acct, info.id), m.highest_modseq).unwrap_or(0);
                    prop_assert!(m.highest_modseq >= prev);
                    prop_assert_eq!(m.messages as usize, entries.len());
                    prop_assert_eq!(m.size, entries.iter().map(|(_, e)| e.size).sum::<u64>());
                    prop_assert_eq!(m.unseen as usize, entries.iter().filter(|(_, e)| !e.flags.contains(Flags::SEEN)).count());
                    for (uid, e) in &entries {
                        prop_assert!(*uid < m.uidnext);
                        prop_assert!(e.modseq <= m.highest_modseq);
                        *refs.entry(e.blob).or_default() += 1;
                    }
                }
            }
            for user in USERS {
                let Some(acct) = store.account_id(user).unwrap() else { continue };
                prop_assert_eq!(store.vector(acct).unwrap(), log_vector(&store, acct));
                check_guids(&store, acct);
                check_replicated(&store, acct, true);
            }
            let (bodies, _) = store.blob_counts().unwrap();
            prop_assert_eq!(bodies, refs.len());
            for (hash, n) in refs {
                prop_assert_eq!(store.blob_meta(&hash).unwrap().unwrap().refs, n);
            }
        }
        // After a restart: the same vectors and GUIDs, and paging from nothing yields the log.
        let before: Vec<_> = USERS
            .iter()
            .filter_map(|u| store.account_id(u).unwrap())
            .map(|a| (a, store.vector(a).unwrap(), check_guids(&store, a), check_replicated(&store, a, true)))
            .collect();
        if page_records % 2 == 1 {
            // As if written before vectors existed: open must derive the same ones from the log.
            for k in store.meta.scan_prefix([keys::VECTOR]).keys() {
                store.meta.remove(k.unwrap()).unwrap();
            }
        }
        // As if written before the replication log: open must give it the same content.
        let migrate = page_bytes % 2 == 0;
        if migrate {
            forget_replication_log(&store);
        }
        store.sync_blocking().unwrap();
        drop(store);
        let store = open(dir.path());
        for (acct, vv, guids, view) in before {
            let after = check_replicated(&store, acct, !migrate);
            if migrate {
                prop_assert_eq!(store.vector(acct).unwrap(), log_vector(&store, acct));
                prop_assert_eq!(without_ids(&after), without_ids(&view));
            } else {
                prop_assert_eq!(store.vector(acct).unwrap(), vv);
                prop_assert_eq!(after, view);
            }
            prop_assert_eq!(check_guids(&store, acct), guids);
            let log = store.changes(acct, None).unwrap();
            prop_assert_eq!(page_all(&store, acct, VersionVector::default(), page_records, page_bytes), log);
        }
    }
}

#[test]
fn one_body_for_many_recipients_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = body(1);
    let targets: Vec<_> = USERS.iter().map(|u| DeliveryTarget { address: u, mailbox: "INBOX", seen: false }).collect();
    store.commit_message(put(&store, &bytes), &targets, Flags::default(), &[], 0, 0).unwrap();
    // The same content delivered again is still one body.
    store.commit_message(put(&store, &bytes), &targets[..1], Flags::default(), &[], 0, 0).unwrap();
    let (bodies, chunks) = store.blob_counts().unwrap();
    assert_eq!((bodies, chunks), (1, 1));
    let hash = *blake3::hash(&bytes).as_bytes();
    assert_eq!(store.blob_meta(&hash).unwrap().unwrap().refs, 4);
}

#[test]
fn uidvalidity_changes_after_delete_and_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let acct = store.ensure_account("a@example.org").unwrap();
    store.create_mailbox(acct, "Work", None).unwrap();
    let first = store.mailbox_by_name(acct, "Work").unwrap().unwrap().mailbox.uidvalidity;
    store.delete_mailbox(acct, "Work").unwrap();
    store.create_mailbox(acct, "Work", None).unwrap();
    let second = store.mailbox_by_name(acct, "Work").unwrap().unwrap().mailbox.uidvalidity;
    assert!(second > first);
    // Default mailboxes carry their SPECIAL-USE attribute.
    let sent = store.mailbox_by_name(acct, "Sent").unwrap().unwrap();
    assert_eq!(sent.mailbox.special_use, Some(SpecialUse::Sent));
    assert_eq!(store.mailbox_by_name(acct, "inbox").unwrap().unwrap().mailbox.name, "INBOX");
}

#[test]
fn reopen_keeps_synced_data_and_drops_unfinished_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let big = body(5);
    {
        let store = open(dir.path());
        let t = [DeliveryTarget { address: USERS[0], mailbox: "INBOX", seen: false }];
        store.commit_message(put(&store, &big), &t, Flags::SEEN, &[], 1_700_000_000, 60).unwrap();
        // A body whose writer was abandoned mid-way (as by a crash): chunks plus pending marker.
        let mut w = store.blob_writer().unwrap();
        w.write(&vec![b'x'; CHUNK_SIZE * 2]).unwrap();
        w.abandon();
        store.sync_blocking().unwrap();
    }
    let store = open(dir.path());
    let acct = store.account_id(USERS[0]).unwrap().unwrap();
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let entries = store.entries(acct, inbox).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.flags, Flags::SEEN);
    assert_eq!(body_of(&store, &entries[0].1.blob), big);
    let (_, chunks) = store.blob_counts().unwrap();
    assert_eq!(chunks, 3, "the abandoned body's chunks were removed at open");
    // The change log recorded the creation of the default mailboxes and the append, in order.
    let log = store.changes(acct, None).unwrap();
    assert!(log.windows(2).all(|w| w[0].id < w[1].id && w[0].modseq < w[1].modseq));
    assert!(matches!(log.last().unwrap().change, Change::Append { uid: 1, .. }));
}

/// `durable::barrier` fdatasyncs sled's log file alone; that is complete only while sled keeps
/// every node in the log. Large multi-chunk bodies (full leaves of the chunks tree) must not
/// spill into `blobs/`, which would need the slower whole-directory sync.
#[test]
fn large_bodies_stay_in_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for n in 0..6u8 {
        let mut body = format!("Subject: big {n}\r\n\r\n").into_bytes();
        body.extend(std::iter::repeat_n(b'a' + n, CHUNK_SIZE * 40));
        let t = [DeliveryTarget { address: USERS[0], mailbox: "INBOX", seen: false }];
        store.commit_message(put(&store, &body), &t, Flags::default(), &[], 0, 0).unwrap();
    }
    store.sync_blocking().unwrap();
    let blobs = std::fs::read_dir(dir.path().join("blobs")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(blobs, 0, "sled wrote node files outside its log");
}

/// A caller dropped in the middle of `sync` (an aborted task) must not leave the group commit
/// stuck for everyone after it.
#[test]
fn sync_survives_cancelled_callers() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for i in 0..50u32 {
            let t = [DeliveryTarget { address: USERS[0], mailbox: "INBOX", seen: false }];
            let body = format!("Subject: {i}\r\n\r\nbody {i}\r\n").into_bytes();
            store.commit_message(put(&store, &body), &t, Flags::default(), &[], 0, 0).unwrap();
            let s = store.clone();
            let task = tokio::spawn(async move { s.sync().await });
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
            task.abort();
            tokio::time::timeout(std::time::Duration::from_secs(10), store.sync())
                .await
                .expect("sync completes after a cancelled caller")
                .unwrap();
        }
    });
}

#[test]
fn prepend_small_and_large_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
    for size in [10usize, CHUNK_SIZE - 5, CHUNK_SIZE * 2 + 17] {
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let mut w = store.blob_writer().unwrap();
        w.write(&body).unwrap();
        assert_eq!(w.contents().unwrap(), body);
        let w = w.prepend(&store, b"X-Added: yes\r\n").unwrap();
        let mut want = b"X-Added: yes\r\n".to_vec();
        want.extend_from_slice(&body);
        assert_eq!(w.contents().unwrap(), want);
        let pending = w.finish().unwrap();
        assert_eq!(pending.hash, *blake3::hash(&want).as_bytes(), "size {size}");
        assert_eq!(pending.size, want.len() as u64);
        let t = [DeliveryTarget::inbox("a@x.test")];
        store.commit_message(pending, &t, Flags::default(), &[], 0, 0).unwrap();
        let hash = *blake3::hash(&want).as_bytes();
        assert_eq!(store.read_blob_bytes(&hash).unwrap().unwrap(), want);
    }
    // Only the committed bodies' chunks remain: the copies' sources were removed.
    let (bodies, chunks) = store.blob_counts().unwrap();
    assert_eq!(bodies, 3);
    assert_eq!(chunks, 1 + 2 + 3);
    // A leading Return-Path stays first, small or large.
    for size in [10usize, CHUNK_SIZE * 2] {
        let mut w = store.blob_writer().unwrap();
        w.write(b"Return-Path: <a@b.test>\r\nReceived: x\r\n").unwrap();
        w.write(&vec![b'z'; size]).unwrap();
        let w = w.prepend(&store, b"X-Top: 1\r\n").unwrap();
        let got = w.contents().unwrap();
        assert!(got.starts_with(b"Return-Path: <a@b.test>\r\nX-Top: 1\r\nReceived: x\r\nzz"), "size {size}");
        assert_eq!(got.len(), 38 + 10 + size);
    }
}

#[test]
fn copy_and_move_share_bodies_until_the_last_reference_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let acct = store.ensure_account("a@example.org").unwrap();
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let archive = store.mailbox_id(acct, "Archive").unwrap().unwrap();
    let trash = store.mailbox_id(acct, "Trash").unwrap().unwrap();
    let (b1, b2) = (body(1), body(5));
    let (h1, h2) = (*blake3::hash(&b1).as_bytes(), *blake3::hash(&b2).as_bytes());
    let t = [DeliveryTarget::inbox("a@example.org")];
    store.commit_message(put(&store, &b1), &t, Flags::SEEN, &["$Work".to_string()], 7, 60).unwrap();
    store.commit_message(put(&store, &b2), &t, Flags::default(), &[], 8, 0).unwrap();
    let refs = |h: &[u8; 32]| store.blob_meta(h).unwrap().map(|m| m.refs);
    let before = store.mailbox(acct, archive).unwrap().unwrap().highest_modseq;

    // COPY: new UIDs in the target, flags and dates kept, one more reference per body; UIDs
    // that do not exist are skipped.
    let pairs = store.copy_messages(acct, inbox, &[1, 2, 99], archive).unwrap();
    assert_eq!(pairs, vec![(1, 1), (2, 2)]);
    assert_eq!((refs(&h1), refs(&h2)), (Some(2), Some(2)));
    let copied = store.entry(acct, archive, 1).unwrap().unwrap();
    let original = store.entry(acct, inbox, 1).unwrap().unwrap();
    assert_eq!((copied.flags, &copied.keywords, copied.internal_date), (Flags::SEEN, &original.keywords, 7));
    assert!(copied.modseq > original.modseq);
    let a = store.mailbox(acct, archive).unwrap().unwrap();
    assert_eq!((a.messages, a.unseen, a.uidnext), (2, 1, 3));
    assert!(a.highest_modseq > before);
    assert_eq!(store.blob_counts().unwrap().0, 2);

    // MOVE: the sources go in the same batch, references stay as they are.
    let pairs = store.move_messages(acct, archive, &[2], trash).unwrap();
    assert_eq!(pairs, vec![(2, 1)]);
    assert_eq!(refs(&h2), Some(2));
    assert_eq!(store.uids(acct, archive).unwrap(), vec![1]);
    assert_eq!(store.uids(acct, trash).unwrap(), vec![1]);
    assert_eq!(store.expunged_since(acct, archive, 0).unwrap(), vec![2]);
    let a = store.mailbox(acct, archive).unwrap().unwrap();
    assert_eq!((a.messages, a.size), (1, b1.len() as u64));
    // The change log has the appends and the expunge, with increasing modseqs.
    let log = store.changes(acct, None).unwrap();
    let tail: Vec<_> = log.iter().rev().take(2).map(|r| &r.change).collect();
    assert!(matches!(tail[0], Change::Expunge { mailbox, uids } if *mailbox == archive && uids == &vec![2]));
    assert!(matches!(tail[1], Change::Append { mailbox, uid: 1, .. } if *mailbox == trash));
    assert!(log.windows(2).all(|w| w[0].modseq <= w[1].modseq));

    // A body survives until its last reference is expunged.
    store.expunge(acct, inbox, &[2]).unwrap();
    assert_eq!(refs(&h2), Some(1));
    assert_eq!(body_of(&store, &h2), b2);
    store.expunge(acct, trash, &[1]).unwrap();
    assert_eq!(refs(&h2), None);
    assert!(store.read_blob(&h2).unwrap().is_none());
    store.expunge(acct, inbox, &[1]).unwrap();
    assert_eq!(refs(&h1), Some(1));
    store.delete_mailbox(acct, "Archive").unwrap();
    assert_eq!(refs(&h1), None);
    assert_eq!(store.blob_counts().unwrap(), (0, 0));

    // Errors: a missing mailbox; nothing to copy is not an error.
    assert!(matches!(store.copy_messages(acct, inbox, &[1], 999), Err(StoreError::NoSuchMailbox)));
    assert_eq!(store.move_messages(acct, inbox, &[42], trash).unwrap(), vec![]);
}

#[test]
fn move_within_one_mailbox_and_append_to_existing_mailboxes_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let acct = store.ensure_account("a@example.org").unwrap();
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let b = body(2);
    let h = *blake3::hash(&b).as_bytes();
    let meta = MessageMeta { flags: Flags::DRAFT, keywords: &[], internal_date: 5, tz_offset_minutes: -90 };
    let (uidvalidity, uid) = store.append_message(acct, inbox, put(&store, &b), &meta).unwrap();
    let m = store.mailbox(acct, inbox).unwrap().unwrap();
    assert_eq!((uidvalidity, uid, m.messages, m.uidnext), (m.uidvalidity, 1, 1, 2));
    let e = store.entry(acct, inbox, 1).unwrap().unwrap();
    assert_eq!((e.flags, e.tz_offset_minutes), (Flags::DRAFT, -90));
    // The same body appended again is stored once.
    store.append_message(acct, inbox, put(&store, &b), &meta).unwrap();
    assert_eq!(store.blob_meta(&h).unwrap().unwrap().refs, 2);
    assert_eq!(store.blob_counts().unwrap(), (1, 1));
    // No such mailbox: refused, and the new body's chunks are gone.
    let r = store.append_message(acct, 999, put(&store, &body(3)), &meta);
    assert!(matches!(r, Err(StoreError::NoSuchMailbox)));
    assert_eq!(store.blob_counts().unwrap(), (1, 1));
    // MOVE to the same mailbox: new UIDs, the old ones expunged, still two references.
    assert_eq!(store.move_messages(acct, inbox, &[1, 2], inbox).unwrap(), vec![(1, 3), (2, 4)]);
    assert_eq!(store.uids(acct, inbox).unwrap(), vec![3, 4]);
    assert_eq!(store.blob_meta(&h).unwrap().unwrap().refs, 2);
    assert_eq!(store.mailbox(acct, inbox).unwrap().unwrap().messages, 2);
}

#[test]
fn append_messages_is_one_batch_and_stores_each_body_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let acct = store.ensure_account("a@example.org").unwrap();
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let meta = MessageMeta { flags: Flags::default(), keywords: &[], internal_date: 1, tz_offset_minutes: 0 };
    store.append_message(acct, inbox, put(&store, &body(1)), &meta).unwrap();
    let items = vec![(put(&store, &body(1)), meta), (put(&store, &body(2)), meta), (put(&store, &body(2)), meta)];
    let (_, uids) = store.append_messages(acct, inbox, items).unwrap();
    assert_eq!(uids, vec![2, 3, 4]);
    let refs = |n: u8| store.blob_meta(blake3::hash(&body(n)).as_bytes()).unwrap().unwrap().refs;
    assert_eq!((refs(1), refs(2)), (2, 2));
    assert_eq!(store.blob_counts().unwrap(), (2, 2));
    assert_eq!(store.mailbox(acct, inbox).unwrap().unwrap().messages, 4);
    // Into a missing mailbox: nothing stored, every new body's chunks dropped.
    let items = vec![(put(&store, &body(3)), meta), (put(&store, &body(4)), meta)];
    assert!(matches!(store.append_messages(acct, 999, items), Err(StoreError::NoSuchMailbox)));
    assert_eq!(store.blob_counts().unwrap(), (2, 2));
}

/// `Mailbox` as it is today plus one trailing defaulted field, as the old comment in `model.rs`
/// suggested for schema growth.
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)] // only decoded
struct MailboxWithGuid {
    name: String,
    uidvalidity: u32,
    uidnext: u32,
    highest_modseq: u64,
    special_use: Option<SpecialUse>,
    subscribed: bool,
    messages: u32,
    unseen: u32,
    size: u64,
    #[serde(default)]
    guid: [u8; 16],
}

/// postcard is not self-describing: a struct is its fields back to back, with no length or
/// field count. So a record written before a field was appended cannot take that field's
/// `#[serde(default)]`: the decoder asks for one more field and finds the end of the input.
/// This test pins that behaviour; it is why new per-record data goes into separate keys (or a
/// migration rewrites the records) instead of appended fields. See `docs/store.md`.
#[test]
fn postcard_does_not_default_appended_fields() {
    let old = Mailbox {
        name: "INBOX".into(),
        uidvalidity: 7,
        uidnext: 3,
        highest_modseq: 9,
        special_use: Some(SpecialUse::Sent),
        subscribed: true,
        messages: 2,
        unseen: 1,
        size: 100,
    };
    let bytes = postcard::to_allocvec(&old).unwrap();
    let err = postcard::from_bytes::<MailboxWithGuid>(&bytes).unwrap_err();
    assert_eq!(err, postcard::Error::DeserializeUnexpectedEnd);

    // Inside a sequence or an enum it is worse than an error: the new field eats the next
    // element's bytes, so a decode can succeed with garbage or fail far from the cause.
    #[derive(serde::Serialize)]
    struct Old(u8, u8);
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct New(u8, u8, #[serde(default)] u8);
    let bytes = postcard::to_allocvec(&vec![Old(1, 2), Old(3, 4)]).unwrap();
    let decoded = postcard::from_bytes::<Vec<New>>(&bytes);
    assert_ne!(decoded, Ok(vec![New(1, 2, 0), New(3, 4, 0)]));
    assert_eq!(decoded, Err(postcard::Error::DeserializeUnexpectedEnd));
    #[derive(serde::Serialize)]
    enum OldChange {
        A { x: u8 },
    }
    #[derive(Debug, PartialEq, serde::Deserialize)]
    enum NewChange {
        A {
            x: u8,
            #[serde(default)]
            y: u8,
        },
    }
    let bytes = postcard::to_allocvec(&(OldChange::A { x: 5 }, 6u8, 7u8)).unwrap();
    // The enum's new field takes the 6 that belongs to the next value: silent corruption.
    let (change, next) = postcard::from_bytes::<(NewChange, u8)>(&bytes).unwrap();
    assert_eq!((change, next), (NewChange::A { x: 5, y: 6 }, 7));

    // The other direction works: a new record read by old code, since trailing bytes are
    // ignored at the top level (`from_bytes` does not insist on consuming everything).
    #[derive(serde::Serialize)]
    struct Longer(u8, u8, u8);
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Shorter(u8, u8);
    assert_eq!(postcard::from_bytes::<Shorter>(&postcard::to_allocvec(&Longer(1, 2, 3)).unwrap()), Ok(Shorter(1, 2)));
}

/// Every mailbox's GUID and the reverse `O` key agree, and each mailbox has one.
fn check_guids(store: &Store, acct: u32) -> HashMap<String, [u8; 16]> {
    let mut out = HashMap::new();
    for info in store.list_mailboxes(acct).unwrap() {
        let guid = store.mailbox_guid(acct, info.id).unwrap().expect("every mailbox has a GUID");
        assert_eq!(store.mailbox_by_guid(acct, &guid).unwrap(), Some(info.id), "{}", info.mailbox.name);
        out.insert(info.mailbox.name, guid);
    }
    let reverse = store.meta.scan_prefix(&keys::mailbox_by_guid(acct, &[0; 16])[..5]).count();
    assert_eq!(reverse, out.len(), "no stale O keys");
    out
}

#[test]
fn mailbox_guids_survive_rename_and_reopen_and_go_with_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (acct, work, guid) = {
        let store = open(dir.path());
        let acct = store.ensure_account("A@example.org").unwrap();
        let work = store.create_mailbox(acct, "Work", None).unwrap();
        let guid = store.mailbox_guid(acct, work).unwrap().unwrap();
        store.rename_mailbox(acct, "Work", "Jobs").unwrap();
        assert_eq!(store.mailbox_guid(acct, work).unwrap(), Some(guid));
        let guids = check_guids(&store, acct);
        assert_eq!(guids["INBOX"], mailbox::default_mailbox_guid("a@example.org", "INBOX"));
        assert_ne!(guids["Jobs"], mailbox::default_mailbox_guid("a@example.org", "Jobs"));
        // A default name deleted and recreated is a new mailbox, with a new (random) GUID.
        store.delete_mailbox(acct, "Archive").unwrap();
        store.create_mailbox(acct, "Archive", Some(SpecialUse::Archive)).unwrap();
        let archive = check_guids(&store, acct)["Archive"];
        assert_ne!(archive, mailbox::default_mailbox_guid("a@example.org", "Archive"));
        store.sync_blocking().unwrap();
        (acct, work, guid)
    };
    let store = open(dir.path());
    assert_eq!(store.mailbox_guid(acct, work).unwrap(), Some(guid));
    assert_eq!(store.mailbox_by_guid(acct, &guid).unwrap(), Some(work));
    store.delete_mailbox(acct, "Jobs").unwrap();
    assert_eq!(store.mailbox_guid(acct, work).unwrap(), None);
    assert_eq!(store.mailbox_by_guid(acct, &guid).unwrap(), None);
    check_guids(&store, acct);
}

#[test]
fn independent_stores_give_default_mailboxes_the_same_guids() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (open(d1.path()), open_as(d2.path(), "other-node"));
    // One store creates the account through a delivery, the other directly.
    let t = [DeliveryTarget::inbox(USERS[1])];
    s1.commit_message(put(&s1, &body(1)), &t, Flags::default(), &[], 0, 0).unwrap();
    let a1 = s1.account_id(USERS[1]).unwrap().unwrap();
    let a2 = s2.ensure_account(USERS[1]).unwrap();
    let (g1, g2) = (check_guids(&s1, a1), check_guids(&s2, a2));
    assert_eq!(g1.len(), DEFAULT_MAILBOXES.len());
    assert_eq!(g1, g2);
    // Another account's defaults differ.
    let b = s1.ensure_account(USERS[2]).unwrap();
    assert_ne!(check_guids(&s1, b)["INBOX"], g1["INBOX"]);
}

#[test]
fn open_gives_guids_to_mailboxes_of_an_older_store() {
    let dir = tempfile::tempdir().unwrap();
    let (acct, before) = {
        let store = open(dir.path());
        let acct = store.ensure_account(USERS[0]).unwrap();
        store.create_mailbox(acct, "Work", None).unwrap();
        store.create_mailbox(acct, "Work/Old", None).unwrap();
        let before = check_guids(&store, acct);
        // Simulate a store written before GUIDs: no K or O keys at all; the next open must
        // also cope with one that was migrated half-way (Work already has its keys).
        let work = store.mailbox_id(acct, "Work").unwrap().unwrap();
        for kind in [keys::MAILBOX_GUID, keys::MAILBOX_BY_GUID] {
            for k in store.meta.scan_prefix([kind]).keys() {
                let k = k.unwrap();
                let keep = (kind == keys::MAILBOX_GUID && k[..] == keys::mailbox_guid(acct, work))
                    || (kind == keys::MAILBOX_BY_GUID && k[..] == keys::mailbox_by_guid(acct, &before["Work"]));
                if !keep {
                    store.meta.remove(k).unwrap();
                }
            }
        }
        assert_eq!(store.mailbox_guid(acct, store.mailbox_id(acct, "INBOX").unwrap().unwrap()).unwrap(), None);
        store.sync_blocking().unwrap();
        (acct, before)
    };
    let after = {
        let store = open(dir.path());
        check_guids(&store, acct)
    };
    for (name, _) in DEFAULT_MAILBOXES {
        assert_eq!(after[name], before[name], "{name} gets its deterministic GUID back");
    }
    assert_eq!(after["Work"], before["Work"], "a mailbox that had a GUID keeps it");
    assert_ne!(after["Work/Old"], before["Work/Old"], "others get a fresh random one");
    // Idempotent: a second open changes nothing.
    assert_eq!(check_guids(&open(dir.path()), acct), after);
}

/// The version vector as the logs say it should be: each node's highest HLC in `C` and `R`
/// (the replication migration writes `R` records without a `C` twin).
fn log_vector(store: &Store, acct: u32) -> VersionVector {
    let mut vv = VersionVector::default();
    for record in store.changes(acct, None).unwrap() {
        vv.advance(record.id);
    }
    for record in store.replicated_records(acct).unwrap() {
        vv.advance(record.id);
    }
    vv
}

/// The account as its `R` log says it is: every record applied to the reference semantics.
fn replicated_view(store: &Store, acct: u32) -> merge::View {
    let mut state = merge::AccountState::default();
    for record in store.replicated_records(acct).unwrap() {
        state.apply(&record);
    }
    state.view()
}

/// The account as the store shows it, in the view's terms (GUIDs, msg ids via `J`), checking
/// that `L` maps each msg id back and that no `J` or `L` key outlives its entry.
fn store_view(store: &Store, acct: u32) -> merge::View {
    let mut view = merge::View::default();
    let mut ids = 0;
    for info in store.list_mailboxes(acct).unwrap() {
        let guid = store.mailbox_guid(acct, info.id).unwrap().expect("GUID");
        let mut messages = BTreeMap::new();
        for (uid, e) in store.entries(acct, info.id).unwrap() {
            let msg = store.message_id(acct, info.id, uid).unwrap().expect("every entry has a msg id");
            assert_eq!(store.message_at(acct, msg).unwrap(), Some((info.id, uid)), "L maps {msg:?} back");
            let keywords: BTreeSet<String> = e.keywords.iter().cloned().collect();
            let row = merge::ViewMessage {
                blob: e.blob,
                size: e.size,
                flags: e.flags,
                keywords: keywords.into_iter().collect(),
            };
            messages.insert(uid, (msg, row));
            ids += 1;
        }
        let m = &info.mailbox;
        let b = merge::ViewMailbox {
            name: m.name.clone(),
            uidvalidity: m.uidvalidity,
            subscribed: m.subscribed,
            special_use: m.special_use,
            messages,
            pending: BTreeMap::new(),
        };
        view.mailboxes.insert(guid, b);
    }
    for kind in [keys::MSG_ID, keys::MSG_AT] {
        let mut prefix = vec![kind];
        prefix.extend_from_slice(&acct.to_be_bytes());
        assert_eq!(store.meta.scan_prefix(prefix).count(), ids, "no stale {} keys", kind as char);
    }
    view
}

/// The merged view of the `R` log equals the store's state; with `twins`, `R` and `C` also hold
/// the same ids (every write logs both). Returns the view.
fn check_replicated(store: &Store, acct: u32, twins: bool) -> merge::View {
    if twins {
        let r: Vec<_> = store.replicated_records(acct).unwrap().into_iter().map(|r| r.id).collect();
        let c: Vec<_> = store.changes(acct, None).unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(r, c, "one R record per C record, same ids");
    }
    let view = store_view(store, acct);
    assert_eq!(replicated_view(store, acct), view);
    view
}

/// A view with msg ids blanked: a migration numbers the same messages afresh.
fn without_ids(view: &merge::View) -> merge::View {
    let mut out = view.clone();
    for b in out.mailboxes.values_mut() {
        for (msg, _) in b.messages.values_mut() {
            *msg = ChangeId { hlc: 0, node: 0 };
        }
    }
    out
}

/// Removes the `R`, `J` and `L` keys and the migration markers: a store written before them.
fn forget_replication_log(store: &Store) {
    for prefix in [&[keys::REPLICATED][..], &[keys::MSG_ID], &[keys::MSG_AT], b"Greplog"] {
        for k in store.meta.scan_prefix(prefix).keys() {
            store.meta.remove(k.unwrap()).unwrap();
        }
    }
}

#[test]
fn vector_follows_the_log_and_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, want_a) = {
        let store = open(dir.path());
        let t = [DeliveryTarget::inbox(USERS[0]), DeliveryTarget::inbox(USERS[1])];
        store.commit_message(put(&store, &body(1)), &t, Flags::default(), &[], 0, 0).unwrap();
        let (a, b) = (store.account_id(USERS[0]).unwrap().unwrap(), store.account_id(USERS[1]).unwrap().unwrap());
        store.create_mailbox(a, "Work", None).unwrap();
        store.rename_mailbox(a, "Work", "Jobs").unwrap();
        let vv = store.vector(a).unwrap();
        assert_eq!(vv, log_vector(&store, a));
        assert_eq!(vv.0.len(), 1);
        let last = store.changes(a, None).unwrap().last().unwrap().id;
        assert_eq!(vv.get(node_id("test-node")), last.hlc);
        assert!(vv.covers(last) && !vv.covers(ChangeId { hlc: last.hlc + 1, ..last }));
        assert!(!vv.covers(ChangeId { hlc: 1, node: node_id("elsewhere") }));
        // A store written before vectors (no V keys for a), and one last written by an older
        // version (b's vector lags its newest record).
        for k in store.meta.scan_prefix(keys::vector_prefix(a)).keys() {
            store.meta.remove(k.unwrap()).unwrap();
        }
        store.meta.insert(keys::vector(b, node_id("test-node")), &1u64.to_be_bytes()).unwrap();
        store.sync_blocking().unwrap();
        (a, b, vv)
    };
    // Records of another origin (as replication will store them) count under their own node.
    let store = open_as(dir.path(), "second-node");
    assert_eq!(store.vector(a).unwrap(), want_a);
    assert_eq!(store.vector(b).unwrap(), log_vector(&store, b));
    store.create_mailbox(a, "Later", None).unwrap();
    let vv = store.vector(a).unwrap();
    assert_eq!(vv.0.len(), 2);
    assert_eq!(vv.get(node_id("test-node")), want_a.get(node_id("test-node")));
    assert!(vv.get(node_id("second-node")) > want_a.get(node_id("test-node")), "the clock floor was kept");
    assert_eq!(vv, log_vector(&store, a));
}

/// Pages through the records `after` lacks, advancing it by each page, and checks each page.
fn page_all(store: &Store, acct: u32, mut after: VersionVector, records: usize, bytes: usize) -> Vec<ChangeRecord> {
    let mut out = Vec::new();
    loop {
        let page = store.changes_page(acct, &after, records, bytes).unwrap();
        if page.is_empty() {
            return out;
        }
        let size: usize = page.iter().map(|r| encode(r).len()).sum();
        assert!(
            page.len() <= records.max(1) && (page.len() == 1 || size <= bytes),
            "{} records, {size} bytes",
            page.len()
        );
        assert!(page.windows(2).all(|w| (w[0].id.hlc, w[0].id.node) < (w[1].id.hlc, w[1].id.node)));
        for r in &page {
            assert!(!after.covers(r.id), "{:?} shipped twice", r.id);
            after.advance(r.id);
        }
        out.extend(page);
    }
}

#[test]
fn changes_page_ships_what_a_vector_lacks_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let acct = store.ensure_account(USERS[0]).unwrap();
    for i in 0..12u8 {
        let t = [DeliveryTarget { address: USERS[0], mailbox: MAILBOXES[i as usize % 3], seen: false }];
        store.commit_message(put(&store, &body(i % 5)), &t, Flags::default(), &[], 0, 0).unwrap();
    }
    // Records of a second origin, interleaved with ours (same HLCs, another node), as
    // replication will store them: key, record and vector entry in one batch.
    let remote = node_id("remote");
    let mut batch = sled::Batch::default();
    for r in store.changes(acct, None).unwrap().iter().step_by(3) {
        let id = ChangeId { hlc: r.id.hlc, node: remote };
        batch.insert(&keys::change(acct, id.hlc, id.node), encode(&ChangeRecord { id, ..r.clone() }));
        batch.insert(&keys::vector(acct, remote), &id.hlc.to_be_bytes());
    }
    store.meta.apply_batch(batch).unwrap();
    let log = store.changes(acct, None).unwrap();
    let held = store.vector(acct).unwrap();
    assert_eq!(held, log_vector(&store, acct));
    let own = node_id("test-node");
    let mid = |node: u32, n: usize| log.iter().filter(|r| r.id.node == node).nth(n).unwrap().id.hlc;
    let vectors = [
        VersionVector::default(),
        VersionVector([(own, mid(own, 10))].into()),
        VersionVector([(remote, mid(remote, 2))].into()),
        VersionVector([(own, mid(own, 3)), (remote, mid(remote, 4)), (node_id("gone"), u64::MAX)].into()),
        held.clone(),
    ];
    for after in vectors {
        let want: Vec<_> = log.iter().filter(|r| !after.covers(r.id)).cloned().collect();
        for (records, bytes) in [(1, usize::MAX), (3, usize::MAX), (100, 0), (100, 300), (usize::MAX, usize::MAX)] {
            assert_eq!(page_all(&store, acct, after.clone(), records, bytes), want, "{after:?} {records} {bytes}");
        }
    }
    assert!(store.changes_page(acct, &held, 10, 10_000).unwrap().is_empty());
    let unknown = store.ensure_account(USERS[1]).unwrap() + 1000;
    assert!(store.changes_page(unknown, &VersionVector::default(), 10, 10_000).unwrap().is_empty());
}

#[test]
fn durable_hlc_covers_only_what_a_finished_flush_saved() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    let own = node_id("test-node");
    assert_eq!(store.durable_hlc(), 0, "nothing is assumed durable after a start");
    let acct = store.ensure_account(USERS[0]).unwrap();
    let first = store.vector(acct).unwrap().get(own);
    assert!(store.durable_hlc() < first);
    store.sync_blocking().unwrap();
    assert!(store.durable_hlc() >= first);
    store.create_mailbox(acct, "Work", None).unwrap();
    let second = store.vector(acct).unwrap().get(own);
    assert!(store.durable_hlc() < second, "a record written after the flush is not covered");

    // A record stamped before a flush starts but applied after it: the watermark must wait for
    // it (it is read under the write lock), or the flush would publish a record it did not save.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for run in 0..2 {
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let _guard = store.write.lock().unwrap();
                let mut batch = sled::Batch::default();
                store.log_change(
                    &mut batch,
                    acct,
                    1000 + run,
                    Change::Subscribe { mailbox: 1, subscribed: true },
                    None,
                );
                tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
                store.apply(batch).unwrap();
            })
        };
        rx.recv().unwrap();
        if run == 0 {
            store.sync_blocking().unwrap();
        } else {
            rt.block_on(store.sync()).unwrap();
        }
        let stamped = store.clock.current();
        let durable = store.durable_hlc();
        let log = store.changes(acct, None).unwrap();
        assert_eq!(log.last().unwrap().id.hlc, stamped, "run {run}: the flush waited for the late record");
        assert!(durable >= stamped, "run {run}: and covers it");
        writer.join().unwrap();
    }
}

/// The `R` records written since the last call (`from` counts those seen), after checking that
/// `R` and `C` hold the same ids.
fn new_ops(store: &Store, acct: u32, from: &mut usize) -> Vec<(ChangeId, merge::Op)> {
    let records = store.replicated_records(acct).unwrap();
    let c: Vec<_> = store.changes(acct, None).unwrap().into_iter().map(|c| c.id).collect();
    assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), c);
    let out = records[*from..].iter().map(|r| (r.id, r.op.clone())).collect();
    *from = records.len();
    out
}

#[test]
fn every_write_logs_its_change_in_cluster_terms() {
    use merge::{Body, FlagKey, Op as R};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let address = "a@example.org";
    let acct = store.ensure_account(address).unwrap();
    let mut seen = 0;
    let guid_of =
        |name: &str| store.mailbox_guid(acct, store.mailbox_id(acct, name).unwrap().unwrap()).unwrap().unwrap();
    let msg_id = |mbox: u32, uid: u32| store.message_id(acct, mbox, uid).unwrap();

    // Account birth: the six default mailboxes, under their deterministic GUIDs.
    let ops = new_ops(&store, acct, &mut seen);
    assert_eq!(ops.len(), DEFAULT_MAILBOXES.len());
    for ((name, special), (_, op)) in DEFAULT_MAILBOXES.iter().zip(&ops) {
        let uidvalidity = store.mailbox_by_name(acct, name).unwrap().unwrap().mailbox.uidvalidity;
        let guid = mailbox::default_mailbox_guid(address, name);
        let want = R::MailboxCreate { guid, name: name.to_string(), uidvalidity, special_use: *special };
        assert_eq!(op, &want);
    }

    // Create, rename (children follow, each under its own GUID), subscribe.
    store.create_mailbox(acct, "Work", Some(SpecialUse::Flagged)).unwrap();
    store.create_mailbox(acct, "Work/Old", None).unwrap();
    let (work, old) = (guid_of("Work"), guid_of("Work/Old"));
    let ops = new_ops(&store, acct, &mut seen);
    let uidvalidity = store.mailbox_by_name(acct, "Work").unwrap().unwrap().mailbox.uidvalidity;
    let want =
        R::MailboxCreate { guid: work, name: "Work".into(), uidvalidity, special_use: Some(SpecialUse::Flagged) };
    assert_eq!(ops[0].1, want);
    assert!(matches!(&ops[1].1, R::MailboxCreate { guid, name, .. } if *guid == old && name == "Work/Old"));
    store.rename_mailbox(acct, "Work", "Jobs").unwrap();
    let ops: Vec<_> = new_ops(&store, acct, &mut seen).into_iter().map(|(_, op)| op).collect();
    let want =
        vec![R::MailboxRename { guid: work, to: "Jobs".into() }, R::MailboxRename { guid: old, to: "Jobs/Old".into() }];
    assert_eq!(ops, want);
    store.set_subscribed(acct, "Jobs/Old", false).unwrap();
    assert_eq!(new_ops(&store, acct, &mut seen)[0].1, R::Subscribe { guid: old, on: false });

    // Delivery: an Append claiming the UID; the msg id is the record's id, in J and L.
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let jobs = store.mailbox_id(acct, "Jobs").unwrap().unwrap();
    let b1 = body(1);
    let h1 = *blake3::hash(&b1).as_bytes();
    let t = [DeliveryTarget::inbox(address)];
    store.commit_message(put(&store, &b1), &t, Flags::SEEN, &["$A".to_string()], 7, 60).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    let body1 = Body { blob: h1, size: b1.len() as u64, internal_date: 7, tz_offset_minutes: 60 };
    let want = R::Append {
        guid: guid_of("INBOX"),
        uid: Some(1),
        body: body1.clone(),
        flags: Flags::SEEN,
        keywords: vec!["$A".into()],
    };
    assert_eq!(ops, vec![(ops[0].0, want)]);
    let m1 = ops[0].0;
    assert_eq!(msg_id(inbox, 1), Some(m1));
    assert_eq!(store.message_at(acct, m1).unwrap(), Some((inbox, 1)));

    // MULTIAPPEND: one Append per message.
    let meta = MessageMeta { flags: Flags::DRAFT, keywords: &[], internal_date: 9, tz_offset_minutes: 0 };
    store.append_messages(acct, jobs, vec![(put(&store, &body(2)), meta), (put(&store, &body(3)), meta)]).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    assert_eq!(ops.len(), 2);
    for (i, (id, op)) in ops.iter().enumerate() {
        let uid = i as u32 + 1;
        assert!(matches!(op, R::Append { guid, uid: Some(u), flags: Flags::DRAFT, .. } if *guid == work && *u == uid));
        assert_eq!(msg_id(jobs, uid), Some(*id));
    }
    let (j1, j2) = (ops[0].0, ops[1].0);

    // Flags: only what changed. Replace \Seen $A by \Flagged $B $A: set \Flagged and $B, clear \Seen.
    store.store_flags(acct, inbox, &[1], FlagOp::Replace, Flags::FLAGGED, &["$B".into(), "$A".into()]).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    let set = vec![FlagKey::System(Flags::FLAGGED.0), FlagKey::Keyword("$B".into())];
    let clear = vec![FlagKey::System(Flags::SEEN.0)];
    assert_eq!(ops[0].1, R::SetFlags { msg: m1, set, clear });
    // Removing a keyword case-insensitively clears the stored spelling; no change, no record.
    store.store_flags(acct, inbox, &[1], FlagOp::Remove, Flags::default(), &["$b".into()]).unwrap();
    let want = R::SetFlags { msg: m1, set: vec![], clear: vec![FlagKey::Keyword("$B".into())] };
    assert_eq!(new_ops(&store, acct, &mut seen)[0].1, want);
    store.store_flags(acct, inbox, &[1], FlagOp::Add, Flags::FLAGGED, &[]).unwrap();
    assert!(new_ops(&store, acct, &mut seen).is_empty());
    // UNCHANGEDSINCE: the one changed gets its record, the one left alone none.
    let (changed, _) =
        store.store_flags_unchanged_since(acct, jobs, &[1, 2], FlagOp::Add, Flags::SEEN, &[], Some(0)).unwrap();
    assert!(changed.is_empty());
    let modseq = store.entry(acct, jobs, 1).unwrap().unwrap().modseq;
    store.store_flags_unchanged_since(acct, jobs, &[1, 1], FlagOp::Add, Flags::SEEN, &[], Some(modseq)).unwrap();
    assert_eq!(store.mailbox(acct, jobs).unwrap().unwrap().unseen, 1, "a UID named twice counts once");
    let want = R::SetFlags { msg: j1, set: vec![FlagKey::System(Flags::SEEN.0)], clear: vec![] };
    assert_eq!(new_ops(&store, acct, &mut seen).into_iter().map(|(_, op)| op).collect::<Vec<_>>(), vec![want]);

    // COPY: a new message (Append into the target with the current flags), new J/L.
    store.copy_messages(acct, inbox, &[1], jobs).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    let want =
        R::Append { guid: work, uid: Some(3), body: body1.clone(), flags: Flags::FLAGGED, keywords: vec!["$A".into()] };
    assert_eq!(ops[0].1, want);
    assert_eq!(msg_id(jobs, 3), Some(ops[0].0));
    assert_eq!(msg_id(inbox, 1), Some(m1), "the source keeps its id");

    // MOVE: Appends into the target, then one Expunge of the sources by msg id; J/L follow.
    store.move_messages(acct, jobs, &[1, 2], inbox).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    assert_eq!(ops.len(), 3);
    assert!(matches!(&ops[0].1, R::Append { guid, uid: Some(2), flags, .. }
        if *guid == guid_of("INBOX") && *flags == Flags::DRAFT.union(Flags::SEEN)));
    assert!(matches!(&ops[1].1, R::Append { uid: Some(3), .. }));
    assert_eq!(ops[2].1, R::Expunge { msgs: vec![j1, j2] });
    assert_eq!((msg_id(jobs, 1), msg_id(jobs, 2)), (None, None));
    assert_eq!(store.message_at(acct, j1).unwrap(), None);
    assert_eq!((msg_id(inbox, 2), msg_id(inbox, 3)), (Some(ops[0].0), Some(ops[1].0)));

    // EXPUNGE: by msg id; J and L go. A UID named twice counts once.
    assert_eq!(store.expunge(acct, inbox, &[1, 99, 1]).unwrap(), vec![1]);
    assert_eq!(store.blob_meta(&h1).unwrap().map(|m| m.refs), Some(1), "the copy in Jobs keeps the body");
    assert_eq!(new_ops(&store, acct, &mut seen)[0].1, R::Expunge { msgs: vec![m1] });
    assert_eq!((msg_id(inbox, 1), store.message_at(acct, m1).unwrap()), (None, None));

    // DELETE: names what this node had seen (its vector just before), and J/L of its messages go.
    let vv = store.vector(acct).unwrap();
    let copy_id = msg_id(jobs, 3).unwrap();
    store.delete_mailbox(acct, "Jobs").unwrap();
    assert_eq!(new_ops(&store, acct, &mut seen)[0].1, R::MailboxDelete { guid: work, seen: vv });
    assert_eq!(store.message_at(acct, copy_id).unwrap(), None);

    // A delivery that recreates a deleted default mailbox: MailboxCreate (random GUID), Append.
    store.delete_mailbox(acct, "Archive").unwrap();
    new_ops(&store, acct, &mut seen);
    let t = [DeliveryTarget { address, mailbox: "Archive", seen: true }];
    store.commit_message(put(&store, &body(4)), &t, Flags::default(), &[], 0, 0).unwrap();
    let ops = new_ops(&store, acct, &mut seen);
    let archive = guid_of("Archive");
    assert_ne!(archive, mailbox::default_mailbox_guid(address, "Archive"));
    assert!(
        matches!(&ops[0].1, R::MailboxCreate { guid, special_use: Some(SpecialUse::Archive), .. } if *guid == archive)
    );
    assert!(matches!(&ops[1].1, R::Append { guid, uid: Some(1), flags: Flags::SEEN, .. } if *guid == archive));

    // And the whole log, merged, is what the store shows.
    check_replicated(&store, acct, true);
}

#[test]
fn open_writes_the_replication_log_of_an_older_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, view_a, view_b) = {
        let store = open(dir.path());
        let t = [DeliveryTarget::inbox(USERS[0]), DeliveryTarget::inbox(USERS[1])];
        store.commit_message(put(&store, &body(1)), &t, Flags::default(), &["$X".into()], 3, 0).unwrap();
        store.commit_message(put(&store, &body(2)), &t[..1], Flags::DRAFT, &[], 4, 0).unwrap();
        let (a, b) = (store.account_id(USERS[0]).unwrap().unwrap(), store.account_id(USERS[1]).unwrap().unwrap());
        let inbox = store.mailbox_id(a, "INBOX").unwrap().unwrap();
        store.store_flags(a, inbox, &[1], FlagOp::Add, Flags::SEEN, &["$Y".into()]).unwrap();
        store.expunge(a, inbox, &[2]).unwrap();
        store.create_mailbox(a, "Work", None).unwrap();
        store.set_subscribed(a, "Work", false).unwrap();
        store.delete_mailbox(a, "Junk").unwrap();
        let (view_a, view_b) = (check_replicated(&store, a, true), check_replicated(&store, b, true));
        forget_replication_log(&store);
        store.sync_blocking().unwrap();
        (a, b, view_a, view_b)
    };
    let records = {
        let store = open_as(dir.path(), "second-node");
        for (acct, view) in [(a, &view_a), (b, &view_b)] {
            let after = check_replicated(&store, acct, false);
            assert_eq!(without_ids(&after), without_ids(view));
            assert_eq!(store.vector(acct).unwrap(), log_vector(&store, acct), "V covers the new records");
            let records = store.replicated_records(acct).unwrap();
            assert!(records.iter().all(|r| r.id.node == node_id("second-node")));
            let creates = records.iter().filter(|r| matches!(r.op, merge::Op::MailboxCreate { .. })).count();
            assert_eq!(creates, after.mailboxes.len());
        }
        // No Subscribe for subscribed mailboxes, one for Work; one Append per message.
        let ops: Vec<_> = store.replicated_records(a).unwrap().into_iter().map(|r| r.op).collect();
        assert_eq!(ops.iter().filter(|op| matches!(op, merge::Op::Subscribe { on: false, .. })).count(), 1);
        assert_eq!(ops.iter().filter(|op| matches!(op, merge::Op::Append { uid: Some(1), .. })).count(), 1);
        // Later writes go on from the migrated ids.
        let inbox = store.mailbox_id(a, "INBOX").unwrap().unwrap();
        store.store_flags(a, inbox, &[1], FlagOp::Remove, Flags::SEEN, &[]).unwrap();
        check_replicated(&store, a, false);
        // A marker lost after the records were written: nothing is written twice.
        store.meta.remove(replog::migrated_marker(b)).unwrap();
        store.sync_blocking().unwrap();
        (store.replicated_records(a).unwrap(), store.replicated_records(b).unwrap())
    };
    let store = open(dir.path());
    assert_eq!((store.replicated_records(a).unwrap(), store.replicated_records(b).unwrap()), records);
    assert!(store.meta.contains_key(replog::migrated_marker(b)).unwrap());
    check_replicated(&store, b, false);
}
