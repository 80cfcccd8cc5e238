//! Nothing acknowledged is ever lost: kill -9 during a stream of deliveries, and a data
//! directory that runs out of space. The store is then opened directly to check exactly what it
//! holds.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Message ids found in a user's INBOX, with how often each appears.
fn stored_ids(data_dir: &std::path::Path, user: &str) -> HashMap<String, usize> {
    let store = open_store(data_dir);
    let mut ids = HashMap::new();
    let Some(acct) = store.account_id(user).unwrap() else { return ids };
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    for (_, e) in store.entries(acct, inbox).unwrap() {
        let raw = store.read_blob_bytes(&e.blob).unwrap().expect("every entry has its body");
        assert_eq!(raw.len() as u64, e.size);
        let text = String::from_utf8_lossy(&raw);
        let id = text.split("Message-ID: <").nth(1).and_then(|r| r.split('@').next()).unwrap().to_string();
        *ids.entry(id).or_default() += 1;
    }
    ids
}

/// Senders on persistent sessions, each recording the ids that got a 250.
fn stream(
    node: &Node,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    tag: &str,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..4)
        .map(|t| {
            let (addr, stop, acked, tag) = (node.smtp, stop.clone(), acked.clone(), tag.to_string());
            std::thread::spawn(move || {
                let Ok(s) = std::net::TcpStream::connect(addr) else { return };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut d = Dialog { reader: std::io::BufReader::new(s) };
                if d.reply().0 != 220 {
                    return;
                }
                d.send("EHLO crash.test");
                d.reply();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = format!("{tag}-{t}-{i}");
                    d.send("MAIL FROM:<sender@peer.test>");
                    d.send("RCPT TO:<alice@example.test>");
                    d.send("DATA");
                    let codes: Vec<u16> = (0..3).map(|_| d.reply().0).collect();
                    if codes != [250, 250, 354] {
                        return;
                    }
                    let body = message(&id, "alice@example.test") + &"padding line\r\n".repeat(200 * (i % 5));
                    d.send_raw(body.as_bytes());
                    d.send_raw(b".\r\n");
                    match d.reply().0 {
                        250 => acked.lock().unwrap().push(id),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

#[test]
fn kill_9_during_deliveries_loses_nothing_acknowledged() {
    let mut node = Node::start(Setup::default());
    let mut all_acked = Vec::new();
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let threads = stream(&node, stop.clone(), acked.clone(), &format!("r{round}"));
        let start = Instant::now();
        while acked.lock().unwrap().len() < 40 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Kill while the senders are mid-transaction.
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        all_acked.extend(acked.lock().unwrap().drain(..));
        let ids = stored_ids(&node.data_dir(), "alice@example.test");
        for id in &all_acked {
            assert_eq!(ids.get(id), Some(&1), "acknowledged message {id} must be stored exactly once (round {round})");
        }
        assert!(ids.values().all(|&n| n == 1), "no message stored twice");
        node.launch();
    }
    assert!(all_acked.len() >= 120);
    // The restarted server serves everything it holds.
    let n = inbox(&node, "alice@example.test").len();
    node.kill9();
    assert_eq!(stored_ids(&node.data_dir(), "alice@example.test").len(), n);
}

#[test]
fn full_disk_refuses_with_451_and_keeps_what_was_acknowledged() {
    let node_dir = tempfile::tempdir().unwrap();
    let mnt = node_dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let status =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"]).arg(&mnt).status();
    assert!(status.is_ok_and(|s| s.success()), "mounting a small tmpfs needs root, as the test command runs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let mut node = Node::start(Setup { extra: "[store]\ncache_size = \"4MiB\"\n".into(), ..Setup::default() });
    // Move the node's data onto the small filesystem.
    node.stop();
    let data = mnt.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let text = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace("data_dir = \"data\"", &format!("data_dir = {:?}", data.display().to_string()));
    std::fs::write(&node.config, text).unwrap();
    node.launch();
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let id = format!("full-{i}");
        let body = message(&id, "alice@example.test") + &format!("{}\r\n", "x".repeat(990)).repeat(200);
        let mut d = smtp(&node);
        d.cmd("MAIL FROM:<sender@peer.test>", 250);
        d.cmd("RCPT TO:<alice@example.test>", 250);
        d.cmd("DATA", 354);
        d.send_raw(body.as_bytes());
        d.send_raw(b".\r\n");
        match d.reply() {
            (250, _) => acked.push(id),
            (451, text) => {
                assert!(text.contains("4.3.0"), "{text}");
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("unexpected reply on a full disk: {other:?}\n{}", node.log()),
        }
    }
    assert!(refused >= 3, "the disk filled up (acked {})", acked.len());
    assert!(!acked.is_empty());
    assert!(node.is_running(), "the server survives a full disk:\n{}", node.log());
    // Make room, restart: everything acknowledged is there, once, and new mail is accepted.
    node.kill9();
    let grown = std::process::Command::new("mount").args(["-o", "remount,size=64m"]).arg(&mnt).status().unwrap();
    assert!(grown.success());
    let ids = stored_ids(&data, "alice@example.test");
    for id in &acked {
        assert_eq!(ids.get(id), Some(&1), "{id}");
    }
    node.launch();
    let (code, _) = send_message(&node, "sender@peer.test", &["alice@example.test"], &message("after", "alice"));
    assert_eq!(code, 250, "{}", node.log());
}

/// 32 concurrent senders on persistent sessions all get their answers. (sled's own
/// `flush_async` deadlocked the server under this load: every I/O thread waited on a write
/// that only the same threads could perform.)
#[test]
fn concurrent_deliveries_all_complete() {
    let node = Node::start(Setup { extra: "[smtp]\nmax_connections_per_ip = 128\n".into(), ..Setup::default() });
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> =
        (0..16).flat_map(|batch| stream(&node, stop.clone(), acked.clone(), &format!("c{batch}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} messages acknowledged:\n{}",
            acked.lock().unwrap().len(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let n = acked.lock().unwrap().len();
    assert_eq!(inbox(&node, "alice@example.test").len(), n);
}
