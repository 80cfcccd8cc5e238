//! Under-replicated deliveries (issue 8: "otherwise it is marked under-replicated and pushed first
//! when a peer returns"), with real primaries on loopback: deliveries answered while the only
//! peer is down are marked in the store, so `postern sync status` and the metrics still count them
//! after the node restarts, and the count drops to 0 once the peer is back and has acknowledged
//! them.

mod common;

use std::time::Duration;

use common::cluster::{deliver, inbox_count, metrics, Primaries};

/// `peer`'s row of `postern sync status`, read from the right (the state may hold spaces):
/// (lag, under-replicated).
fn figures(text: &str, peer: &str) -> (String, String) {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(peer)).unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    let n = cells.len();
    (cells[n - 4].to_string(), cells[n - 2].to_string())
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn under_replicated_count_survives_a_restart_and_clears_when_the_peer_acks() {
    let c = Primaries::new("ack_timeout = \"1s\"", false);
    // B never started: every delivery to A is answered without a peer's ack.
    let mut a = c.start("a");
    deliver(&a, 0..3, "alone");
    let (_, text) = a.cli(&["sync", "status"]);
    assert_eq!(figures(&text, "b").1, "3", "{text}");
    assert_eq!(metric(&metrics(&a), "postern_sync_under_replicated"), Some(3));

    // A clean restart, B still down: the markers are in the store.
    a.stop();
    a.launch();
    let (ok, text) = a.cli(&["sync", "status"]);
    assert!(!ok, "B is down: {text}");
    assert_eq!(figures(&text, "b").1, "3", "the count outlives the restart:\n{text}");
    assert_eq!(metric(&metrics(&a), "postern_sync_under_replicated"), Some(3));

    // B comes up: A pushes what it missed, B acknowledges it, the count goes to 0.
    let b = c.start("b");
    let mut last = String::new();
    common::wait_for("B to acknowledge the under-replicated deliveries", Duration::from_secs(60), || {
        let (ok, text) = a.cli(&["sync", "status"]);
        let (lag, under) = figures(&text, "b");
        last = text;
        ok && lag == "0" && under == "0"
    });
    eprintln!("{last}");
    assert_eq!(metric(&metrics(&a), "postern_sync_under_replicated"), Some(0));
    assert_eq!(inbox_count(&b), 3, "B holds the three messages");
}
