//! Test harness: starts the real `postern` binary on loopback with ephemeral ports, from a
//! generated cluster file, and gives tests raw SMTP/IMAP helpers plus ways to run the external
//! clients (swaks, Python imaplib, mbsync) the test command installs.
#![allow(dead_code)]

pub mod cluster;
pub mod dns;
pub mod pebble;
pub mod sink;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "test-password-1";

/// A cluster file for one primary node; users get `PASSWORD`.
pub struct Setup {
    pub domains: Vec<String>,
    pub users: Vec<String>,
    /// Appended to the file (new tables).
    pub extra: String,
    /// Appended inside `[nodes.test]` (e.g. more `listen.*` keys).
    pub node_extra: String,
    /// The node's hostname (two nodes in one test need different ones: a server that greets
    /// with our own name is a mail loop).
    pub hostname: String,
    /// `listen.smtp` (a fixed port lets a test restart a receiver where a sender expects it).
    pub smtp_listen: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            domains: vec!["example.test".into(), "example.net".into()],
            users: vec!["alice@example.test".into(), "bob@example.test".into()],
            extra: String::new(),
            node_extra: String::new(),
            hostname: "mx.example.test".into(),
            smtp_listen: "127.0.0.1:0".into(),
        }
    }
}

fn password_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| postern::auth::hash_password(PASSWORD)).clone()
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub cert: PathBuf,
    child: Option<Child>,
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    pub imaps: SocketAddr,
    /// Every `listening PROTO ADDR` line of the last start.
    pub listening: Vec<(String, SocketAddr)>,
    stderr_path: PathBuf,
    /// The node's DNS when the test gives none: answers NXDOMAIN for everything, at once, so
    /// inbound checks and reverse lookups never depend on the machine's resolver.
    _dns: Option<dns::TestDns>,
    /// `--node NAME`, for a cluster file with several nodes.
    node_name: Option<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_postern")
}

impl Node {
    pub fn start(setup: Setup) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        let domains: Vec<String> = setup.domains.iter().map(|d| format!("{d:?}")).collect();
        let mut text = format!(
            "[cluster]\ndomains = [{}]\n\n[nodes.test]\nhostname = \"{}\"\nrole = \"primary\"\n\
             data_dir = \"data\"\nlisten.smtp = [\"{}\"]\nlisten.imap = [\"127.0.0.1:0\"]\n\
             listen.imaps = [\"127.0.0.1:0\"]\n{}\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n",
            domains.join(", "),
            setup.hostname,
            setup.smtp_listen,
            setup.node_extra
        );
        for u in &setup.users {
            text.push_str(&format!("[users.\"{u}\"]\npassword = \"{}\"\n\n", password_hash()));
        }
        text.push_str(&setup.extra);
        let own_dns = if setup.extra.contains("[dns]") {
            None
        } else {
            let dns = dns::TestDns::start("");
            text.push_str(&format!("\n[dns]\nnameservers = [\"{}\"]\n", dns.addr()));
            Some(dns)
        };
        let config = dir.path().join("postern.toml");
        std::fs::write(&config, text).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let mut node = Node {
            dir,
            config,
            cert: cert_path,
            child: None,
            smtp: "0.0.0.0:0".parse().unwrap(),
            imap: "0.0.0.0:0".parse().unwrap(),
            imaps: "0.0.0.0:0".parse().unwrap(),
            listening: Vec::new(),
            stderr_path,
            _dns: own_dns,
            node_name: None,
        };
        node.launch();
        node
    }

    /// Starts node `name` of a cluster file the test wrote itself (several nodes of one
    /// cluster share it; relative paths in it are relative to its directory). The log goes to
    /// `NAME.stderr.log` beside the file. IMAP helpers expect `listen.imaps` on 127.0.0.1 and
    /// the certificate in `cert.pem` beside the file.
    pub fn start_named(config: &Path, name: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = config.parent().expect("config directory");
        let mut node = Node {
            dir,
            config: config.to_path_buf(),
            // By convention the cluster file's certificate (python_imap trusts it).
            cert: base.join("cert.pem"),
            child: None,
            smtp: "0.0.0.0:0".parse().unwrap(),
            imap: "0.0.0.0:0".parse().unwrap(),
            imaps: "0.0.0.0:0".parse().unwrap(),
            listening: Vec::new(),
            stderr_path: base.join(format!("{name}.stderr.log")),
            _dns: None,
            node_name: Some(name.to_string()),
        };
        node.launch();
        node
    }

    /// Runs `postern ARGS --config FILE [--node NAME]` for this node; (exit ok, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--config").arg(&self.config);
        if let Some(n) = &self.node_name {
            cmd.args(["--node", n]);
        }
        let out = cmd.output().expect("run postern");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// The first address the node listens on for `proto` ("submission", "submissions", ...).
    pub fn addr(&self, proto: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|(p, _)| p == proto)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("node does not listen for {proto}"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the process and waits for `postern ready`, reading the real listening ports.
    pub fn launch(&mut self) {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr_path).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"]).arg(&self.config);
        if let Some(n) = &self.node_name {
            cmd.args(["--node", n]);
        }
        let mut child =
            cmd.env("POSTERN_LOG", "info").stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn postern");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        self.listening.clear();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!("postern did not become ready; stderr:\n{}", self.log()),
            };
            if let Some((proto, addr)) = postern::server::parse_listening_line(&line) {
                self.listening.push((proto.clone(), addr));
                match proto.as_str() {
                    "smtp" => self.smtp = addr,
                    "imap" => self.imap = addr,
                    "imaps" => self.imaps = addr,
                    _ => {}
                }
            }
            if line.starts_with("postern ready") {
                break;
            }
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The process id while the node runs (to send it signals, e.g. SIGSTOP to freeze it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A raw line-oriented client for SMTP and IMAP dialogues.
pub struct Dialog {
    pub reader: BufReader<TcpStream>,
}

impl Dialog {
    pub fn connect(addr: SocketAddr) -> Dialog {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // A command and its data go out as separate small writes: without this, Nagle's
        // algorithm and the server's delayed ACK hold each one back ~40 ms.
        s.set_nodelay(true).unwrap();
        Dialog { reader: BufReader::new(s) }
    }

    pub fn send_raw(&mut self, data: &[u8]) {
        self.reader.get_mut().write_all(data).expect("write");
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.reader.read_line(&mut s).expect("read");
        s
    }

    /// Reads one SMTP reply (all continuation lines) and returns its code and full text.
    pub fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                return (0, text);
            }
            text.push_str(&l);
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return (l[..3].parse().unwrap_or(0), text);
            }
        }
    }

    /// Sends an SMTP command and asserts the reply code.
    pub fn cmd(&mut self, line: &str, code: u16) -> String {
        self.send(line);
        let (c, text) = self.reply();
        assert_eq!(c, code, "{line} -> {text}");
        text
    }

    /// True when the server has closed the connection.
    /// True when the server closes the connection (after whatever it still sends, such as a
    /// TLS alert) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            }
        }
    }
}

/// An SMTP session at the point after EHLO.
pub fn smtp(node: &Node) -> Dialog {
    let mut d = Dialog::connect(node.smtp);
    assert_eq!(d.reply().0, 220);
    d.cmd("EHLO client.test", 250);
    d
}

/// Sends one message over a plain SMTP session; returns the final reply code.
pub fn send_message(node: &Node, from: &str, to: &[&str], body: &str) -> (u16, String) {
    let mut d = smtp(node);
    d.cmd(&format!("MAIL FROM:<{from}>"), 250);
    for t in to {
        d.cmd(&format!("RCPT TO:<{t}>"), 250);
    }
    d.cmd("DATA", 354);
    d.send_raw(body.as_bytes());
    d.send_raw(b".\r\n");
    let r = d.reply();
    d.send("QUIT");
    r
}

/// Runs a Python snippet with `HOST`, `PORT` (imaps), `CAFILE`, `PASSWORD` defined and
/// helper `login(user)` returning an imaplib connection. Returns stdout; panics on failure.
pub fn python_imap(node: &Node, script: &str) -> String {
    let out = Command::new("python3").arg("-c").arg(python_program(node, script)).output().expect("python3");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Python program `python_imap` runs: the prelude, then `script`.
pub fn python_program(node: &Node, script: &str) -> String {
    let prelude = format!(
        "import imaplib, ssl, sys, json\nHOST='127.0.0.1'\nPORT={}\nPORT143={}\nCAFILE={:?}\nPASSWORD={:?}\n\
         def tls():\n    c = ssl.create_default_context(cafile=CAFILE)\n    c.check_hostname = False\n    return c\n\
         def login(user):\n    m = imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls())\n    m.login(user, PASSWORD)\n    return m\n",
        node.imaps.port(),
        node.imap.port(),
        node.cert.display().to_string(),
        PASSWORD
    );
    format!("{prelude}{script}")
}

/// Submits `msg` as alice over 587 (STARTTLS + AUTH) with Python's smtplib.
pub fn submit(node: &Node, from: &str, to: &[&str], msg: &str) {
    let script = format!(
        "import smtplib\ns = smtplib.SMTP(HOST, {}, timeout=20)\ns.starttls(context=tls())\n\
         s.login('alice@example.test', PASSWORD)\nprint(s.sendmail({from:?}, {to:?}, {msg:?}.encode()))\ns.quit()\n",
        node.addr("submission").port()
    );
    let out = python_imap(node, &script);
    assert_eq!(out.trim(), "{}", "{out}");
}

/// Messages in a user's INBOX, read over IMAP with imaplib: raw bytes of each, in UID order.
pub fn inbox(node: &Node, user: &str) -> Vec<Vec<u8>> {
    let out = python_imap(
        node,
        &format!(
            "m = login({user:?})\nm.select('INBOX', readonly=True)\ntyp, data = m.uid('FETCH', '1:*', '(BODY.PEEK[])')\n\
             msgs = [d[1].hex() for d in data if isinstance(d, tuple)]\nprint(json.dumps(msgs))\n"
        ),
    );
    let hex: Vec<String> = serde_json_lite(&out);
    hex.into_iter()
        .map(|h| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect())
        .collect()
}

/// Parses a JSON array of strings (all the tests need, without a JSON dependency).
pub fn serde_json_lite(s: &str) -> Vec<String> {
    let s = s.trim().trim_start_matches('[').trim_end_matches(']');
    s.split(',').map(|x| x.trim().trim_matches('"').to_string()).filter(|x| !x.is_empty()).collect()
}

/// Opens the node's store directly (the node must be stopped).
pub fn open_store(data_dir: &Path) -> postern::store::Store {
    postern::store::Store::open(&data_dir.join("store"), "inspect", 8 << 20).expect("open store")
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A message with a unique Message-ID and subject, CRLF line endings.
pub fn message(id: &str, to: &str) -> String {
    format!(
        "From: Sender <sender@peer.test>\r\nTo: {to}\r\nSubject: test {id}\r\nMessage-ID: <{id}@peer.test>\r\n\
         Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello {id}.\r\n..a line with a leading dot\r\n"
    )
}

/// The body as the client meant it, after removing dot-stuffing.
pub fn unstuffed(m: &str) -> String {
    m.replace("\r\n..", "\r\n.")
}

/// Strips the Return-Path and Received headers this node prepended.
pub fn strip_trace(stored: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(stored);
    let idx = s.find("\r\nFrom: ").map(|i| i + 2).unwrap_or(0);
    stored[idx..].to_vec()
}

/// The message files of a Maildir folder (`cur/` and `new/`), sorted.
pub fn maildir_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["cur", "new"] {
        if let Ok(rd) = std::fs::read_dir(folder.join(sub)) {
            files.extend(rd.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    files
}

/// The Message-ID of a Maildir message file, without the angle brackets.
pub fn maildir_message_id(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().find(|l| l.to_ascii_lowercase().starts_with("message-id:")).expect("a Message-ID");
    line.split_once(':').unwrap().1.trim().trim_start_matches('<').trim_end_matches('>').to_string()
}

/// Python helpers for `python_imap` scripts that speak raw IMAP: `cmd(m, text)` sends one
/// command on an imaplib connection and returns (untagged lines, tagged completion without the
/// tag); `ok(r)` asserts OK and returns the lines; `code(lines, name)` reads a response code's
/// number; `qresync_session()` logs alice in with QRESYNC enabled.
pub const PY_RAW_IMAP: &str = r#"
def cmd(m, text):
    tag = m._new_tag().decode()
    m.send(('%s %s\r\n' % (tag, text)).encode())
    lines = []
    while True:
        l = m.readline().decode().rstrip('\r\n')
        if l.startswith(tag + ' '):
            return lines, l[len(tag) + 1:]
        lines.append(l)

def ok(r):
    assert r[1].startswith('OK'), r
    return r[0]

def code(lines, name):
    for l in lines:
        if l.startswith('* OK [%s ' % name):
            return int(l.split()[3].rstrip(']'))
    raise AssertionError('no %s in %r' % (name, lines))

def qresync_session():
    m = login('alice@example.test')
    assert ok(cmd(m, 'ENABLE QRESYNC')) == ['* ENABLED QRESYNC']
    return m
"#;
