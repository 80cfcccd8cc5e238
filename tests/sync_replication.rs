//! Mailbox replication between two real primaries on loopback (issue 8): mail delivered to either
//! node, flags, expunges, folders and moves made on either node end up identical on both, as
//! Python's imaplib sees them (UIDVALIDITY, UID → body hash, flags), including after the link
//! between them was cut while both took mail, after a node was down while mail arrived, and after
//! one was killed with SIGKILL in the middle of a sync.
//!
//! Each node's `sync_address` points at a TCP relay the test owns, so the test can cut the link
//! while both nodes keep running and the shared config file stays identical.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::{message, python_imap, send_message, Node};

const SECRET: &str = "the replication test cluster secret";
const ALICE: &str = "alice@example.test";

/// A TCP relay in front of a node's sync listener that the test can cut and restore.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let mut all = c.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, open, conns }
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    _dns: TestDns,
    relays: Vec<Relay>,
}

/// Two primaries `a` and `b`; each one's sync address is a relay in front of its listener.
fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("cluster.key"), format!("{SECRET}\n")).unwrap();
    let dns = TestDns::start("");
    let ports = [common::pebble::free_port(), common::pebble::free_port()];
    let relays: Vec<Relay> = ports.iter().map(|p| Relay::start(SocketAddr::from(([127, 0, 0, 1], *p)))).collect();
    let hash = postern::auth::hash_password(common::PASSWORD);
    let node = |name: &str, port: u16, relay: SocketAddr| {
        format!(
            "[nodes.{name}]\nhostname = \"{name}.example.test\"\nrole = \"primary\"\ndata_dir = \"{name}-data\"\n\
             listen.smtp = [\"127.0.0.1:0\"]\nlisten.imaps = [\"127.0.0.1:0\"]\nlisten.metrics = [\"127.0.0.1:0\"]\n\
             listen.sync = [\"127.0.0.1:{port}\"]\nsync_address = \"{relay}\"\n\n"
        )
    };
    let text = format!(
        "[cluster]\ndomains = [\"example.test\"]\nsecret_file = \"cluster.key\"\n\n{}{}\
         [sync]\n\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[dns]\nnameservers = [\"{}\"]\n\n\
         [users.\"{ALICE}\"]\npassword = \"{hash}\"\n",
        node("a", ports[0], relays[0].addr),
        node("b", ports[1], relays[1].addr),
        dns.addr()
    );
    std::fs::write(dir.path().join("cluster.toml"), &text).unwrap();
    Cluster { dir, _dns: dns, relays }
}

impl Cluster {
    fn config(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }
    fn start(&self, name: &str) -> Node {
        Node::start_named(&self.config(), name)
    }
    fn cut(&self) {
        self.relays.iter().for_each(Relay::cut);
    }
    fn heal(&self) {
        self.relays.iter().for_each(Relay::heal);
    }
}

/// Everything a client sees of alice's account on one node, one line per mailbox and message:
/// mailbox name and UIDVALIDITY, then per message UID, flags and the SHA-256 of the body.
fn dump(node: &Node) -> String {
    python_imap(
        node,
        &format!(
            "import hashlib, re\nm = login({ALICE:?})\nout = []\n\
             typ, boxes = m.list()\n\
             names = sorted(re.match(rb'\\(.*?\\) \"?.\"? \"?(.*?)\"?$', b).group(1).decode() for b in boxes)\n\
             for name in names:\n\
             \x20   typ, _ = m.select('\"%s\"' % name, readonly=True)\n\
             \x20   uv = m.response('UIDVALIDITY')[1][0].decode()\n\
             \x20   out.append('%s %s' % (name, uv))\n\
             \x20   typ, data = m.uid('FETCH', '1:*', '(FLAGS BODY.PEEK[])')\n\
             \x20   for d in data:\n\
             \x20       if isinstance(d, tuple):\n\
             \x20           uid = re.search(rb'UID (\\d+)', d[0]).group(1).decode()\n\
             \x20           flags = sorted(re.search(rb'FLAGS \\((.*?)\\)', d[0]).group(1).decode().split())\n\
             \x20           out.append('  %s %s %s' % (uid, ' '.join(f for f in flags if f != '\\\\Recent'), hashlib.sha256(d[1]).hexdigest()[:16]))\n\
             print('\\n'.join(out))\n"
        ),
    )
}

/// Waits until both nodes show the same account; returns it.
fn converge(a: &Node, b: &Node, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let (mut da, mut db) = (String::new(), String::new());
    while Instant::now() < deadline {
        da = dump(a);
        db = dump(b);
        if da == db {
            return da;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("the nodes did not converge:\n--- a\n{da}\n--- b\n{db}\n--- a log\n{}\n--- b log\n{}", a.log(), b.log());
}

fn count(dump: &str, mailbox: &str) -> usize {
    let mut lines = dump.lines().skip_while(|l| !l.starts_with(&format!("{mailbox} ")));
    lines.next();
    lines.take_while(|l| l.starts_with("  ")).count()
}

/// Many messages in one SMTP session (one transaction each), for volume.
fn deliver_many(node: &Node, ids: std::ops::Range<usize>, tag: &str) {
    let mut d = common::smtp(node);
    for i in ids {
        d.cmd("MAIL FROM:<sender@peer.test>", 250);
        d.cmd(&format!("RCPT TO:<{ALICE}>"), 250);
        d.cmd("DATA", 354);
        d.send_raw(message(&format!("{tag}{i}"), ALICE).as_bytes());
        d.cmd(".", 250);
    }
    d.send("QUIT");
}

/// How many messages alice's INBOX holds on `node` (IMAP STATUS).
fn inbox_count(node: &Node) -> usize {
    let out = python_imap(
        node,
        &format!(
            "m = login({ALICE:?})\nprint(m.status('INBOX', '(MESSAGES)')[1][0].split()[-1].strip(b')').decode())\n"
        ),
    );
    out.trim().parse().unwrap()
}

fn deliver(node: &Node, ids: std::ops::Range<usize>, tag: &str) {
    for i in ids {
        let (code, text) = send_message(node, "sender@peer.test", &[ALICE], &message(&format!("{tag}{i}"), ALICE));
        assert_eq!(code, 250, "{text}");
    }
}

fn wait_connected(node: &Node, peer: &str) {
    common::wait_for("the sync link", Duration::from_secs(30), || {
        let (ok, text) = node.cli(&["sync", "status"]);
        ok && text.lines().any(|l| l.starts_with(peer) && l.contains("connected"))
    });
}

#[test]
fn mail_and_changes_on_either_node_replicate_to_the_other() {
    let c = cluster();
    let a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    deliver(&a, 0..10, "a");
    let first = converge(&a, &b, Duration::from_secs(60));
    assert_eq!(count(&first, "INBOX"), 10, "{first}");
    // Same UIDs on both nodes: mail delivered to A is numbered by A and kept by B.
    assert!(first.contains("\n  1 ") && first.contains("\n  10 "), "{first}");

    deliver(&b, 10..15, "b");
    // Changes on B: flags, a new folder, a move, an expunge; on A: a keyword.
    python_imap(
        &b,
        &format!(
            "m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '1:3', '+FLAGS', '(\\\\Seen)')\n\
             m.create('Projects')\nm.uid('MOVE', '4:5', 'Projects')\n\
             m.uid('STORE', '6', '+FLAGS', '(\\\\Deleted)')\nm.expunge()\nm.logout()\n"
        ),
    );
    python_imap(&a, &format!("m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '7', '+FLAGS', '(urgent)')\n"));
    let second = converge(&a, &b, Duration::from_secs(60));
    assert_eq!(count(&second, "INBOX"), 15 - 2 - 1, "{second}");
    assert_eq!(count(&second, "Projects"), 2, "{second}");
    assert!(second.contains("  1 \\Seen "), "{second}");
    assert!(second.contains("  7 urgent "), "{second}");
    assert!(!second.lines().any(|l| l.starts_with("  6 ")), "expunged everywhere:\n{second}");
    // Anti-entropy compared the account once B held everything A sent, and found it equal.
    for (node, peer) in [(&a, "b"), (&b, "a")] {
        common::wait_for("an anti-entropy comparison", Duration::from_secs(30), || {
            let (_, text) = node.cli(&["sync", "status"]);
            text.lines()
                .any(|l| l.starts_with(peer) && l.split_whitespace().last().is_some_and(|c| c.starts_with("ok/")))
        });
    }
    assert!(!a.log().contains("anomaly") && !b.log().contains("anomaly"));
}

#[test]
fn both_nodes_take_mail_while_the_link_is_cut_and_converge_after() {
    let c = cluster();
    let a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    deliver(&a, 0..3, "before");
    converge(&a, &b, Duration::from_secs(60));

    c.cut();
    deliver(&a, 0..20, "a");
    deliver(&b, 0..20, "b");
    python_imap(
        &b,
        &format!("m = login({ALICE:?})\nm.select('INBOX')\nm.uid('STORE', '1', '+FLAGS', '(\\\\Flagged)')\n"),
    );
    c.heal();
    // Equal dumps can be a moment between the allocator's rounds: wait for all 43.
    let deadline = Instant::now() + Duration::from_secs(90);
    let after = loop {
        let d = converge(&a, &b, Duration::from_secs(90));
        if count(&d, "INBOX") == 43 || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(count(&after, "INBOX"), 43, "nothing lost:\n{after}\nA LOG\n{}\nB LOG\n{}", a.log(), b.log());
    // Both sides numbered their 20 from UID 4: the allocator (a, first in order) renumbered.
    assert!(a.log().contains("UIDs assigned to held messages"), "{}", a.log());
    assert!(after.contains("  1 \\Flagged "), "{after}");
    // No UID names two bodies (the dump has one line per UID, and the UIDs are distinct).
    let uids: Vec<&str> =
        after.lines().filter(|l| l.starts_with("  ")).map(|l| l.split_whitespace().next().unwrap()).collect();
    let mut sorted = uids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), uids.len(), "{after}");
}

#[test]
fn a_node_down_while_mail_arrives_catches_up_even_after_a_sigkill_mid_sync() {
    let c = cluster();
    let a = c.start("a");
    let mut b = c.start("b");
    wait_connected(&a, "b");
    b.stop();
    let total = 2000;
    deliver_many(&a, 0..total, "m");
    b.launch();
    // Kill B in the middle of its catch-up, then start it again.
    let mut seen = 0;
    common::wait_for("the catch-up to start", Duration::from_secs(60), || {
        seen = inbox_count(&b);
        seen > 0
    });
    b.kill9();
    assert!(seen < total, "the catch-up ended before the kill ({seen} of {total}): make it bigger");
    b.launch();
    let after = converge(&a, &b, Duration::from_secs(180));
    assert_eq!(count(&after, "INBOX"), total, "nothing lost");
    // Same UIDs as on A, 1..=total, so a client failing over re-downloads nothing.
    assert!(after.contains(&format!("\n  {total} ")), "{}", &after[..200]);
}
