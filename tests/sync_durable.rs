//! Durable delivery across nodes (issue 8, plan §4), with two real primaries on loopback: an SMTP
//! 250 from a node whose peer is reachable means the peer already holds the message on disk; a
//! peer that is connected but does not answer costs a delivery at most `[sync] ack_timeout` and
//! leaves it counted under-replicated in `postern sync status` until the peer has it; with no
//! peer at all, deliveries are answered without waiting.
//!
//! Each node's `sync_address` points at a TCP relay the test owns, so the test can freeze the
//! link (connections stay open, bytes stop) while both nodes keep running.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::{message, python_imap, send_message, Node};

const SECRET: &str = "the durable delivery test cluster secret";
const ALICE: &str = "alice@example.test";

/// A TCP relay in front of a node's sync listener. Frozen, it keeps every connection open but
/// holds the bytes back (a partition the nodes cannot see at once); thawed, they flow again.
struct Relay {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    while f.load(Ordering::SeqCst) {
                                        std::thread::sleep(Duration::from_millis(10));
                                    }
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
        Relay { addr, frozen }
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    _dns: TestDns,
    relays: Vec<Relay>,
}

/// Two primaries `a` and `b` with `ack_timeout = "1s"`; each one's sync address is a relay.
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
         [sync]\nack_timeout = \"1s\"\n\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[dns]\nnameservers = [\"{}\"]\n\n\
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
    fn freeze(&self, frozen: bool) {
        self.relays.iter().for_each(|r| r.frozen.store(frozen, Ordering::SeqCst));
    }
}

fn wait_connected(node: &Node, peer: &str) {
    common::wait_for("the sync link", Duration::from_secs(30), || {
        let (ok, text) = node.cli(&["sync", "status"]);
        ok && text.lines().any(|l| l.starts_with(peer) && l.contains("connected"))
    });
}

/// `peer`'s row of `postern sync status`, read from the right (the state may hold spaces):
/// (lag, oldest, under-replicated).
fn figures(text: &str, peer: &str) -> (String, String, String) {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(peer)).unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    let n = cells.len();
    (cells[n - 4].to_string(), cells[n - 3].to_string(), cells[n - 2].to_string())
}

fn metrics(node: &Node) -> String {
    let mut s = TcpStream::connect(node.addr("metrics")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Messages in alice's INBOX on `node`.
fn inbox_count(node: &Node) -> usize {
    let out = python_imap(
        node,
        &format!(
            "import re\nm = login({ALICE:?})\ntyp, d = m.status('INBOX', '(MESSAGES)')\n\
             print(re.search(rb'MESSAGES (\\d+)', d[0]).group(1).decode())\n"
        ),
    );
    out.trim().parse().unwrap()
}

/// Delivers one message over SMTP; returns how long the whole session took.
fn timed_delivery(node: &Node, id: &str) -> Duration {
    let t = Instant::now();
    let (code, text) = send_message(node, "sender@peer.test", &[ALICE], &message(id, ALICE));
    assert_eq!(code, 250, "{text}");
    t.elapsed()
}

#[test]
fn a_250_means_the_peer_already_holds_the_message() {
    let c = cluster();
    let a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    wait_connected(&b, "a");
    // One Python process: 20 deliveries to A over SMTP, and after each 250, without waiting,
    // B's INBOX over IMAP must already count it; then the same for an IMAP APPEND on A.
    let out = python_imap(
        &b,
        &format!(
            "import re, smtplib, time\nm = login({ALICE:?})\n\
             def count():\n    typ, d = m.status('INBOX', '(MESSAGES)')\n    \
             return int(re.search(rb'MESSAGES (\\d+)', d[0]).group(1))\n\
             base = count()\nlat = []\n\
             for i in range(20):\n    s = smtplib.SMTP(HOST, {port}, timeout=30)\n    s.ehlo('client.test')\n    \
             msg = 'From: sender@peer.test\\r\\nTo: {ALICE}\\r\\nSubject: d%d\\r\\nMessage-ID: <d%d@peer.test>\\r\\n\\r\\nbody %d\\r\\n' % (i, i, i)\n    \
             t = time.time()\n    s.sendmail('sender@peer.test', [{ALICE:?}], msg)\n    lat.append(time.time() - t)\n    \
             s.quit()\n    n = count()\n    \
             if n != base + i + 1:\n        print('MISSING after delivery %d: B has %d, expected %d' % (i, n, base + i + 1))\n        sys.exit(0)\n\
             lat.sort()\n\
             ma = imaplib.IMAP4_SSL(HOST, {imaps}, ssl_context=tls())\nma.login({ALICE:?}, PASSWORD)\n\
             typ, _ = ma.append('INBOX', None, None, b'Subject: appended\\r\\n\\r\\nby IMAP\\r\\n')\n\
             assert typ == 'OK', typ\n\
             if count() != base + 21:\n    print('MISSING after APPEND on A: B has %d' % count())\n    sys.exit(0)\n\
             print('ok median %.1f ms max %.1f ms' % (lat[len(lat) // 2] * 1000, lat[-1] * 1000))\n",
            port = a.smtp.port(),
            imaps = a.imaps.port()
        ),
    );
    assert!(out.starts_with("ok"), "{out}\n--- a log\n{}\n--- b log\n{}", a.log(), b.log());
    eprintln!("delivery to A with B live (MAIL..DATA reply): {}", out.trim());
    let (ok, text) = a.cli(&["sync", "status"]);
    assert!(ok, "{text}");
    let (lag, _, under) = figures(&text, "b");
    assert_eq!((lag.as_str(), under.as_str()), ("0", "0"), "{text}");
}

#[test]
fn an_unanswering_peer_costs_the_ack_timeout_and_counts_under_replicated_until_healed() {
    let c = cluster();
    let a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    wait_connected(&b, "a");
    // The account exists on both and B's vectors are known.
    let warm = timed_delivery(&a, "warm");
    eprintln!("delivery to A with B live (whole SMTP session): {warm:?}");
    assert!(warm < Duration::from_millis(900), "a live peer answers well within the timeout: {warm:?}");

    c.freeze(true);
    let took = timed_delivery(&a, "frozen");
    assert!(took >= Duration::from_millis(900), "the 250 waited for the ack timeout: {took:?}");
    assert!(took < Duration::from_secs(5), "and no longer: {took:?}");
    // (The exit status stays 0 here: the peer is connected and the lag is under 10 s, plan §5.)
    let (_, text) = a.cli(&["sync", "status"]);
    let (lag, _, under) = figures(&text, "b");
    assert!(lag.parse::<u64>().unwrap() >= 1, "{text}");
    assert!(under.parse::<u64>().unwrap() >= 1, "{text}");
    let m = metrics(&a);
    assert!(metric(&m, "postern_sync_under_replicated").unwrap() >= 1, "{m}");
    assert!(metric(&m, "postern_sync_lag_changes{peer=\"b\"}").unwrap() >= 1, "{m}");

    c.freeze(false);
    let mut last = String::new();
    common::wait_for("the lag to clear after the heal", Duration::from_secs(60), || {
        let (ok, text) = a.cli(&["sync", "status"]);
        let (lag, _, under) = figures(&text, "b");
        last = text;
        ok && lag == "0" && under == "0"
    });
    let m = metrics(&a);
    assert_eq!(metric(&m, "postern_sync_under_replicated"), Some(0), "{m}\n{last}");
    assert_eq!(metric(&m, "postern_sync_lag_changes{peer=\"b\"}"), Some(0), "{m}");
    assert_eq!(inbox_count(&b), 2, "B holds both messages");
}

#[test]
fn with_no_live_peer_deliveries_do_not_wait() {
    let c = cluster();
    let a = c.start("a");
    let mut b = c.start("b");
    wait_connected(&a, "b");
    timed_delivery(&a, "warm");
    b.stop();
    common::wait_for("A to see B down", Duration::from_secs(30), || {
        let (_, text) = a.cli(&["sync", "status"]);
        text.lines().any(|l| l.starts_with("b ") && l.contains("down"))
    });
    let mut times = Vec::new();
    for i in 0..5 {
        times.push(timed_delivery(&a, &format!("alone{i}")));
    }
    let max = times.iter().max().unwrap();
    eprintln!("delivery to A with B down (whole SMTP session): max {max:?}, all {times:?}");
    assert!(*max < Duration::from_millis(800), "no peer, no wait for the 1 s timeout: {times:?}");
    // The same measure as with B live in the first test: MAIL..DATA reply, by smtplib.
    let out = python_imap(
        &a,
        &format!(
            "import smtplib, time\nlat = []\n\
             for i in range(20):\n    s = smtplib.SMTP(HOST, {port}, timeout=30)\n    s.ehlo('client.test')\n    \
             msg = 'From: sender@peer.test\\r\\nTo: {ALICE}\\r\\nSubject: n%d\\r\\n\\r\\nbody %d\\r\\n' % (i, i)\n    \
             t = time.time()\n    s.sendmail('sender@peer.test', [{ALICE:?}], msg)\n    lat.append(time.time() - t)\n    \
             s.quit()\n\
             lat.sort()\nprint('median %.1f ms max %.1f ms' % (lat[len(lat) // 2] * 1000, lat[-1] * 1000))\n",
            port = a.smtp.port()
        ),
    );
    eprintln!("delivery to A with B down (MAIL..DATA reply): {}", out.trim());
    let (_, text) = a.cli(&["sync", "status"]);
    let (lag, _, under) = figures(&text, "b");
    assert_eq!(under, "25", "every delivery counted:\n{text}");
    assert!(lag.parse::<u64>().unwrap() >= 25, "{text}");

    // B returns: what it missed is pushed and the count goes back to zero.
    b.launch();
    common::wait_for("B to catch up", Duration::from_secs(60), || {
        let (ok, text) = a.cli(&["sync", "status"]);
        let (lag, _, under) = figures(&text, "b");
        ok && lag == "0" && under == "0"
    });
    assert_eq!(inbox_count(&b), 26);
}
