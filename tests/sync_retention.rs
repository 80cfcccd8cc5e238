//! Retention between two real primaries (issue 8, "Catch-up"): with `[sync] retention = "2s"`
//! each node folds records older than two seconds into its base snapshot. Nodes kept apart
//! longer than that can no longer send each other the records the other lacks; each is sent
//! the other's snapshot instead, joins it, and replays its own changes. Python's imaplib then
//! sees the same mailboxes on both, with every expunge from either side holding.

mod common;

use std::time::Duration;

use common::cluster::{converge, converge_to, count, deliver, wait_connected, Primaries, ALICE};
use common::python_imap;

fn pruned(node: &common::Node) -> usize {
    node.log().matches("sync retention pruned=").count()
}

#[test]
fn nodes_apart_longer_than_retention_catch_up_from_snapshots() {
    let c = Primaries::new("retention = \"2s\"\n", true);
    let a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    deliver(&a, 0..6, "a");
    let first = converge(&a, &b, Duration::from_secs(60));
    assert_eq!(count(&first, "INBOX"), 6, "{first}");

    c.cut();
    let (pa, pb) = (pruned(&a), pruned(&b));
    // Apart: A expunges UID 1 and flags 2, B expunges 3, tags 4 and makes a folder; both take
    // mail (the same new UIDs on both sides: the allocator renumbers them after).
    python_imap(
        &a,
        &format!(
            "m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '1', '+FLAGS', '(\\\\Deleted)')\nm.expunge()\n\
             m.uid('STORE', '2', '+FLAGS', '(\\\\Seen)')\nm.logout()\n"
        ),
    );
    python_imap(
        &b,
        &format!(
            "m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '3', '+FLAGS', '(\\\\Deleted)')\nm.expunge()\n\
             m.uid('STORE', '4', '+FLAGS', '(urgent)')\nm.create('Apart')\nm.logout()\n"
        ),
    );
    deliver(&a, 6..9, "a");
    deliver(&b, 9..11, "b");
    // Past retention (2 s) and one more pass (every second): every change made apart is pruned.
    std::thread::sleep(Duration::from_secs(4));
    assert!(pruned(&a) > pa && pruned(&b) > pb, "both nodes pruned while apart");

    c.heal();
    // Both took mail apart (UIDs 7..): held until the allocator renumbers it.
    let after = converge_to(&a, &b, "INBOX", 6 - 2 + 3 + 2, Duration::from_secs(90));
    assert_eq!(count(&after, "INBOX"), 6 - 2 + 3 + 2, "{after}");
    assert!(!after.lines().any(|l| l.starts_with("  1 ") || l.starts_with("  3 ")), "expunges hold:\n{after}");
    assert!(after.contains("  2 \\Seen "), "{after}");
    assert!(after.contains("  4 urgent "), "{after}");
    assert!(after.lines().any(|l| l.starts_with("Apart ")), "{after}");
    for node in [&a, &b] {
        let log = node.log();
        assert!(log.contains("sync snapshot installed account=alice@example.test"), "{log}");
        assert!(!log.contains("anomaly"), "{log}");
    }

    // After the snapshots, changes flow as records again, and survive a restart of B (its
    // state is rebuilt from its base snapshot and what is left of its log).
    python_imap(
        &a,
        &format!("m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '2', '+FLAGS', '(\\\\Flagged)')\n"),
    );
    let later = converge(&a, &b, Duration::from_secs(60));
    assert!(later.contains("  2 \\Flagged \\Seen ") || later.contains("  2 \\Seen \\Flagged "), "{later}");
    drop(b);
    let b = c.start("b");
    assert_eq!(converge(&a, &b, Duration::from_secs(60)), later);
}
