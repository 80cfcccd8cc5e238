//! Two replicating primaries `a` and `b` on loopback, for the replication tests: one cluster
//! file, a self-signed certificate, the cluster secret, a test DNS and user alice. Each node's
//! `sync_address` can point at a TCP relay the test owns, so a test can cut or freeze the link
//! while both nodes keep running and the shared config file stays identical.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dns::TestDns;
use super::{message, python_imap, send_message, Node};

pub const ALICE: &str = "alice@example.test";
const SECRET: &str = "the replication tests' cluster secret";

/// A TCP relay in front of a node's sync listener.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, frozen) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, f, c) = (open.clone(), frozen.clone(), conns.clone());
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
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, open, frozen, conns }
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Keeps the connections open but holds every byte back (a peer that stopped answering).
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

pub struct Primaries {
    pub dir: tempfile::TempDir,
    _dns: TestDns,
    pub relays: Vec<Relay>,
}

impl Primaries {
    /// `sync` is the body of the `[sync]` table; `relayed` puts a relay in front of each node.
    pub fn new(sync: &str, relayed: bool) -> Primaries {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("cluster.key"), format!("{SECRET}\n")).unwrap();
        let dns = TestDns::start("");
        let ports = [super::pebble::free_port(), super::pebble::free_port()];
        let targets = ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let relays: Vec<Relay> = if relayed { targets.iter().map(|t| Relay::start(*t)).collect() } else { Vec::new() };
        let dial = |i: usize| relays.get(i).map_or(targets[i], |r| r.addr);
        let hash = postern::auth::hash_password(super::PASSWORD);
        let node = |name: &str, i: usize| {
            format!(
                "[nodes.{name}]\nhostname = \"{name}.example.test\"\nrole = \"primary\"\ndata_dir = \"{name}-data\"\n\
                 listen.smtp = [\"127.0.0.1:0\"]\nlisten.imaps = [\"127.0.0.1:0\"]\n\
                 listen.metrics = [\"127.0.0.1:0\"]\nlisten.sync = [\"{}\"]\nsync_address = \"{}\"\n\n",
                targets[i],
                dial(i)
            )
        };
        let text = format!(
            "[cluster]\ndomains = [\"example.test\"]\nsecret_file = \"cluster.key\"\n\n{}{}\
             [sync]\n{sync}\n\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[dns]\nnameservers = [\"{}\"]\n\n\
             [users.\"{ALICE}\"]\npassword = \"{hash}\"\n",
            node("a", 0),
            node("b", 1),
            dns.addr()
        );
        std::fs::write(dir.path().join("cluster.toml"), &text).unwrap();
        Primaries { dir, _dns: dns, relays }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    pub fn start(&self, name: &str) -> Node {
        Node::start_named(&self.config(), name)
    }

    pub fn cut(&self) {
        self.relays.iter().for_each(Relay::cut);
    }

    pub fn heal(&self) {
        self.relays.iter().for_each(Relay::heal);
    }

    pub fn freeze(&self, frozen: bool) {
        self.relays.iter().for_each(|r| r.freeze(frozen));
    }
}

pub fn wait_connected(node: &Node, peer: &str) {
    super::wait_for("the sync link", Duration::from_secs(30), || {
        let (ok, text) = node.cli(&["sync", "status"]);
        ok && text.lines().any(|l| l.starts_with(peer) && l.contains("connected"))
    });
}

/// Everything a client sees of alice's account on one node, one line per mailbox and message:
/// mailbox name and UIDVALIDITY, then per message UID, flags and the SHA-256 of the body.
pub fn dump(node: &Node) -> String {
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
pub fn converge(a: &Node, b: &Node, timeout: Duration) -> String {
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

/// `converge` until `mailbox` holds `n` messages on both: equal dumps can be a moment between
/// the allocator's rounds, with messages still held. Returns the last dump.
pub fn converge_to(a: &Node, b: &Node, mailbox: &str, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let d = converge(a, b, timeout);
        if count(&d, mailbox) == n || Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Messages listed under `mailbox` in a dump.
pub fn count(dump: &str, mailbox: &str) -> usize {
    let mut lines = dump.lines().skip_while(|l| !l.starts_with(&format!("{mailbox} ")));
    lines.next();
    lines.take_while(|l| l.starts_with("  ")).count()
}

/// One SMTP session per message.
pub fn deliver(node: &Node, ids: std::ops::Range<usize>, tag: &str) {
    for i in ids {
        let (code, text) = send_message(node, "sender@peer.test", &[ALICE], &message(&format!("{tag}{i}"), ALICE));
        assert_eq!(code, 250, "{text}");
    }
}

/// Many messages in one SMTP session (one transaction each), for volume.
pub fn deliver_many(node: &Node, ids: std::ops::Range<usize>, tag: &str) {
    deliver_parallel(node, ids, tag, 1);
}

/// Messages `tag{id}` over `sessions` concurrent SMTP sessions, each pipelining its
/// MAIL/RCPT/DATA group (the server advertises PIPELINING; RFC 2920 §3.1: DATA ends a group)
/// and sending the body with its final dot in one write. Without TCP_NODELAY the separate
/// small writes meet the server's delayed ACK (Nagle): about 45 ms per message instead of 3.
/// The node's group commit makes concurrent sessions share their fsyncs.
pub fn deliver_parallel(node: &Node, ids: std::ops::Range<usize>, tag: &str, sessions: usize) {
    let ids: Vec<usize> = ids.collect();
    let per_session = ids.len().div_ceil(sessions.max(1)).max(1);
    std::thread::scope(|s| {
        for chunk in ids.chunks(per_session) {
            s.spawn(move || {
                let mut d = super::Dialog::connect(node.smtp);
                d.reader.get_ref().set_nodelay(true).unwrap();
                assert_eq!(d.reply().0, 220);
                assert!(d.cmd("EHLO client.test", 250).contains("PIPELINING"));
                let envelope = format!("MAIL FROM:<sender@peer.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n");
                for i in chunk {
                    d.send_raw(envelope.as_bytes());
                    for (what, code) in [("MAIL", 250), ("RCPT", 250), ("DATA", 354)] {
                        let (c, text) = d.reply();
                        assert_eq!(c, code, "{what} for {tag}{i}: {text}");
                    }
                    d.send_raw(format!("{}.\r\n", message(&format!("{tag}{i}"), ALICE)).as_bytes());
                    let (c, text) = d.reply();
                    assert_eq!(c, 250, "end of data for {tag}{i}: {text}");
                }
                d.send("QUIT");
            });
        }
    });
}

/// Messages in alice's INBOX on `node` (IMAP STATUS).
pub fn inbox_count(node: &Node) -> usize {
    let out = python_imap(
        node,
        &format!(
            "import re\nm = login({ALICE:?})\ntyp, d = m.status('INBOX', '(MESSAGES)')\n\
             print(re.search(rb'MESSAGES (\\d+)', d[0]).group(1).decode())\n"
        ),
    );
    out.trim().parse().unwrap()
}

/// The node's Prometheus text.
pub fn metrics(node: &Node) -> String {
    let mut s = TcpStream::connect(node.addr("metrics")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
