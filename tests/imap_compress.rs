//! COMPRESS=DEFLATE (RFC 4978) on the real binary: a Python client with zlib in raw-deflate
//! mode (imaplib has no COMPRESS) over TLS, and mbsync, which turns compression on by itself when
//! the server advertises it.

mod common;

use std::fs;
use std::process::Command;

use common::*;

const ALICE: &str = "alice@example.test";

/// Python helpers: `Z`, a compressed IMAP connection over TLS after LOGIN and COMPRESS, and
/// `raw()`, a plain one. `Z.send` compresses with a sync flush per call, as RFC 4978 §4 asks.
const PY_HELPERS: &str = r#"
import socket, zlib, time, smtplib
class Raw:
    def __init__(self):
        s = socket.create_connection((HOST, PORT), timeout=20)
        self.s = tls().wrap_socket(s, server_hostname='localhost')
        self.buf = b''
    def recv_bytes(self):
        d = self.s.recv(65536)
        if not d:
            raise EOFError('server closed')
        return d
    def fill(self):
        self.buf += self.recv_bytes()
    def line(self):
        while b'\r\n' not in self.buf:
            self.fill()
        l, self.buf = self.buf.split(b'\r\n', 1)
        return l
    def take(self, n):
        while len(self.buf) < n:
            self.fill()
        d, self.buf = self.buf[:n], self.buf[n:]
        return d
    def send(self, data):
        self.s.sendall(data)
    def cmd(self, text):
        tag = text.split(b' ', 1)[0]
        self.send(text + b'\r\n')
        return self.until(tag)
    def until(self, tag):
        out = []
        while True:
            l = self.line()
            out.append(l)
            if l.startswith(tag + b' '):
                return out
class Z(Raw):
    def __init__(self):
        Raw.__init__(self)
        self.zin = None
        assert self.line().startswith(b'* OK [CAPABILITY')
        r = self.cmd(b'a1 LOGIN alice@example.test ' + PASSWORD.encode())
        assert r[-1].startswith(b'a1 OK') and b'COMPRESS=DEFLATE' in r[-1], r
        r = self.cmd(b'a2 COMPRESS DEFLATE')
        assert r == [b'a2 OK DEFLATE active'], r
        assert self.buf == b'', self.buf
        self.wire_in = 0
        self.zin = zlib.decompressobj(wbits=-15)
        self.zout = zlib.compressobj(wbits=-15)
    def recv_bytes(self):
        if self.zin is None:
            return Raw.recv_bytes(self)
        while True:
            d = Raw.recv_bytes(self)
            self.wire_in += len(d)
            d = self.zin.decompress(d)
            if d:
                return d
    def send(self, data):
        if self.zin is None:
            return Raw.send(self, data)
        self.s.sendall(self.zout.compress(data) + self.zout.flush(zlib.Z_SYNC_FLUSH))
def deliver(subject, body):
    s = smtplib.SMTP(HOST, SMTP_PORT, timeout=20)
    msg = 'From: s@peer.test\r\nTo: alice@example.test\r\nSubject: ' + subject + '\r\n\r\n' + body
    s.sendmail('s@peer.test', ['alice@example.test'], msg.encode())
    s.quit()
"#;

fn python(node: &Node, script: &str) -> String {
    let prelude = format!("SMTP_PORT={}\n{PY_HELPERS}", node.smtp.port());
    python_imap(node, &format!("{prelude}{script}"))
}

#[test]
fn compressed_session_fetches_idles_and_pipelines() {
    let node = Node::start(Setup::default());
    let out = python(
        &node,
        r#"
import random
rnd = random.Random(7)
# About 600 KB: lines of words (compressible) and of random letters (not very).
lines = []
for i in range(8000):
    if i % 2:
        lines.append(' '.join(rnd.choice(['alpha', 'beta', 'gamma', 'delta', 'mail']) for _ in range(12)))
    else:
        lines.append(''.join(rnd.choice('abcdefghijklmnopqrstuvwxyz0123456789') for _ in range(70)))
deliver('big', '\r\n'.join(lines) + '\r\n')
deliver('small', 'hello\r\n')

# What an uncompressed session reads, to compare byte for byte.
m = login('alice@example.test')
m.select('INBOX', readonly=True)
plain = m.fetch('1', '(BODY.PEEK[])')[1][0][1]
m.logout()
assert len(plain) > 500000, len(plain)

z = Z()
# Only one COMPRESS per connection (RFC 4978 §3), and only DEFLATE.
r = z.cmd(b'b1 COMPRESS DEFLATE')
assert r == [b'b1 NO [COMPRESSIONACTIVE] DEFLATE active via COMPRESS'], r
r = z.cmd(b'b2 COMPRESS LZ4')
assert r[-1].startswith(b'b2 BAD'), r
r = z.cmd(b'b3 SELECT INBOX')
assert b'* 2 EXISTS' in r and r[-1].startswith(b'b3 OK'), r
# A large FETCH, byte-exact.
before = z.wire_in
z.send(b'b4 FETCH 1 (BODY.PEEK[])\r\n')
head = z.line()
assert head.startswith(b'* 1 FETCH (BODY[] {') and head.endswith(b'}'), head
n = int(head[head.rindex(b'{') + 1:-1])
body = z.take(n)
assert body == plain, (len(body), len(plain))
assert z.line() == b')'
assert z.line().startswith(b'b4 OK')
print('fetch', n, 'wire', z.wire_in - before)

# A literal inside the compressed stream (APPEND with a synchronising literal).
msg = b'From: a@example.test\r\nSubject: appended\r\n\r\nvia compress\r\n'
z.send(b'b5 APPEND INBOX {%d}\r\n' % len(msg))
assert z.line().startswith(b'+'), 'no continuation'
z.send(msg + b'\r\n')
r = z.until(b'b5')
assert r[-1].startswith(b'b5 OK'), r

# Pipelined: several commands in one compressed write, answers in order.
z.send(b'p1 NOOP\r\np2 UID FETCH 1:* (FLAGS)\r\np3 SEARCH SUBJECT appended\r\np4 NOOP\r\n')
got = []
while len(got) < 4:
    l = z.line()
    if l[:2] in (b'p1', b'p2', b'p3', b'p4'):
        got.append(l.split(b' ')[0])
    if l.startswith(b'* SEARCH'):
        assert l == b'* SEARCH 3', l
assert got == [b'p1', b'p2', b'p3', b'p4'], got

# IDLE: a delivery is announced through the compressed stream (sync flush per response).
z.send(b'i1 IDLE\r\n')
assert z.line().startswith(b'+ '), 'no idling'
t0 = time.time()
deliver('during idle', 'ping\r\n')
seen = None
while seen is None:
    l = z.line()
    if l.endswith(b'EXISTS'):
        seen = l
assert seen == b'* 4 EXISTS', seen
waited = time.time() - t0
z.send(b'DONE\r\n')
r = z.until(b'i1')
assert r[-1].startswith(b'i1 OK'), r
print('idle', round(waited, 3))

r = z.cmd(b'l1 LOGOUT')
assert r[-1].startswith(b'l1 OK') and r[0].startswith(b'* BYE'), r
print('ok')
"#,
    );
    assert!(out.contains("ok"), "{out}");
    eprintln!("{out}");
}

#[test]
fn compress_state_rules_and_pipelining_right_after_it() {
    let node = Node::start(Setup::default());
    let out = python(
        &node,
        r#"
# Not before authentication (RFC 4978 §3: authenticated and selected states only).
c = Raw()
c.line()
r = c.cmd(b'x1 COMPRESS DEFLATE')
assert r[-1].startswith(b'x1 BAD'), r
r = c.cmd(b'x2 COMPRESS')
assert r[-1].startswith(b'x2 BAD'), r
r = c.cmd(b'x3 LOGIN alice@example.test ' + PASSWORD.encode())
assert r[-1].startswith(b'x3 OK'), r
r = c.cmd(b'x4 COMPRESS DEFLATE EXTRA')
assert r[-1].startswith(b'x4 BAD'), r
# A command sent in the same packet as COMPRESS, already compressed: the server must inflate
# it, not read it as text (RFC 4978 §4).
zo = zlib.compressobj(wbits=-15)
zi = zlib.decompressobj(wbits=-15)
c.send(b'x5 COMPRESS DEFLATE\r\n' + zo.compress(b'x6 NOOP\r\n') + zo.flush(zlib.Z_SYNC_FLUSH))
assert c.line() == b'x5 OK DEFLATE active'
data = c.buf
c.buf = b''
text = zi.decompress(data)
while b'x6 ' not in text:
    text += zi.decompress(Raw.recv_bytes(c))
assert text == b'x6 OK NOOP completed\r\n', text
print('ok')
"#,
    );
    assert!(out.contains("ok"), "{out}");
}

/// The line limit applies to inflated input: a 20 MB line that compresses to about 20 KB gets
/// the same BAD as uncompressed, and the session goes on (the server inflates a block at a
/// time and drops it, never holding the line).
#[test]
fn overlong_compressed_line_gets_the_same_bad() {
    let node = Node::start(Setup::default());
    let out = python(
        &node,
        r#"
c = Raw()
c.line()
c.cmd(b'a1 LOGIN alice@example.test ' + PASSWORD.encode())
c.send(b'a2 NOOP ' + b'x' * 20000 + b'\r\n')
plain = c.line()
r = c.cmd(b'a3 NOOP')
assert r == [b'a3 OK NOOP completed'], r

z = Z()
line = b'b1 NOOP ' + b'x' * (20 << 20) + b'\r\n'
packed = z.zout.compress(line) + z.zout.flush(zlib.Z_SYNC_FLUSH)
assert len(packed) < 100000, len(packed)
z.s.sendall(packed)
got = z.line()
assert got == plain == b'* BAD Command line too long', (got, plain)
r = z.cmd(b'b2 NOOP')
assert r == [b'b2 OK NOOP completed'], r
# Garbage that is not DEFLATE: the server closes the connection.
z.s.sendall(b'\xff' * 64)
try:
    while True:
        z.fill()
except (EOFError, ConnectionError, zlib.error):
    pass
print('ok')
"#,
    );
    assert!(out.contains("ok"), "{out}");
}

/// isync 1.4 sends COMPRESS DEFLATE whenever the server advertises it: a pull through it.
#[test]
fn mbsync_pulls_with_compression() {
    let node = Node::start(Setup::default());
    for i in 0..5 {
        let msg = message(&format!("z{i}"), ALICE);
        assert_eq!(send_message(&node, "sender@peer.test", &[ALICE], &msg).0, 250);
    }
    let home = node.dir.path().join("mbsync");
    let maildir = home.join("Mail");
    fs::create_dir_all(&maildir).unwrap();
    let rc = home.join("mbsyncrc");
    fs::write(
        &rc,
        format!(
            "IMAPAccount test\nHost 127.0.0.1\nPort {}\nUser {ALICE}\nPass {PASSWORD}\nSSLType IMAPS\n\
             CertificateFile {}\n\nIMAPStore remote\nAccount test\n\nMaildirStore local\nPath {}/\nInbox {}/INBOX\n\n\
             Channel test\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n",
            node.imaps.port(),
            node.cert.display(),
            maildir.display(),
            maildir.display()
        ),
    )
    .unwrap();
    let out =
        Command::new("mbsync").arg("-Dn").arg("-c").arg(&rc).arg("-a").env("HOME", &home).output().expect("mbsync");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mbsync failed:\n{log}\nserver:\n{}", node.log());
    let sent = |l: &str| l.starts_with(">>> ") && l.ends_with("COMPRESS DEFLATE");
    assert!(log.lines().any(sent), "mbsync did not compress:\n{log}");
    // mbsync may exit before the server has logged the end of the session.
    wait_for("the server to log mbsync's logout", std::time::Duration::from_secs(5), || {
        node.log().contains("imap disconnected reason=logout")
    });
    let mut pulled = Vec::new();
    for sub in ["new", "cur"] {
        for e in fs::read_dir(maildir.join("INBOX").join(sub)).unwrap() {
            pulled.push(fs::read_to_string(e.unwrap().path()).unwrap());
        }
    }
    assert_eq!(pulled.len(), 5, "{log}");
    for i in 0..5 {
        let subject = format!("Subject: test z{i}\n");
        assert_eq!(pulled.iter().filter(|m| m.contains(&subject)).count(), 1, "z{i} missing:\n{log}");
    }
}

/// The memory a compressed session costs (docs/imap.md quotes it): 40 sessions each compress a
/// FETCH; the server's RSS growth is compared with that of 40 uncompressed sessions doing the same.
#[test]
fn compressed_sessions_cost_bounded_memory() {
    let node = Node::start(Setup { extra: "[imap]\nmax_connections_per_ip = 200\n".into(), ..Setup::default() });
    let pid = server_pid(&node);
    let out = python(
        &node,
        &format!(
            r#"
PID = {pid}
def rss():
    for l in open('/proc/%d/status' % PID):
        if l.startswith('VmRSS:'):
            return int(l.split()[1])
deliver('m', ''.join('line %d of a message of some length\r\n' % i for i in range(3000)))
def use(c):
    r = c.cmd(b's1 SELECT INBOX')
    assert r[-1].startswith(b's1 OK'), r
    r = c.cmd(b's2 FETCH 1 (BODY.PEEK[])')
    assert r[-1].startswith(b's2 OK'), r
def plain():
    c = Raw()
    c.line()
    c.cmd(b'a1 LOGIN alice@example.test ' + PASSWORD.encode())
    return c
N = 40
time.sleep(0.5)
base = rss()
ps = [plain() for _ in range(N)]
for c in ps:
    use(c)
time.sleep(0.5)
mid = rss()
zs = [Z() for _ in range(N)]
for c in zs:
    use(c)
time.sleep(0.5)
top = rss()
print('plain_kib', (mid - base) // N, 'compressed_kib', (top - mid) // N)
"#
        ),
    );
    eprintln!("{out}");
    let words: Vec<&str> = out.split_whitespace().collect();
    let kib = |name: &str| -> u64 { words[words.iter().position(|w| *w == name).unwrap() + 1].parse().unwrap() };
    // Measured: about 150 KiB for a session, 370 KiB with compression (the deflate state).
    assert!(kib("compressed_kib") < kib("plain_kib") + 320, "compression costs too much:\n{out}");
}

/// The node's process id, found by its config path on the command line.
fn server_pid(node: &Node) -> u32 {
    let config = node.config.display().to_string();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).contains(&config) {
            return pid;
        }
    }
    panic!("server process not found");
}
