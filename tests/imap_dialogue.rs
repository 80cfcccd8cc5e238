//! Scripted IMAP dialogues: every `tests/imap/*.dialogue` file is played against a freshly
//! started node (users alice@example.test and bob@example.test, password `test-password-1`).
//! A new file is picked up by itself; `DIALOGUE=name cargo test --test imap_dialogue` plays only
//! the files whose name contains `name`, and `DIALOGUE_VERBOSE=1` prints every exchange (with
//! `-- --nocapture`), which is how to see what the server says when writing a new file. All files are played (several at once), and every
//! failing file is reported together, with file:line, the expectation, the actual lines, the
//! recent exchange and the tail of the server log.
//!
//! # Transcript format
//!
//! One step per line. Blank lines and lines starting with `#` are ignored. After the `X:`
//! prefix one space is dropped; the rest of the line is taken verbatim (a trailing `\r` too).
//!
//! Client lines (sent on the current session):
//! - `C: TEXT` sends TEXT and CRLF. `C:` alone sends just CRLF.
//! - `C+: TEXT` sends TEXT without CRLF (the first part of a line, or a literal's body).
//! - `C=: TEXT` sends TEXT with escapes `\r \n \t \0 \\ \xNN` decoded, nothing added.
//! - `C#: N TEXT` sends TEXT repeated N times, nothing added (over-long lines, deep nesting).
//!
//! Server lines (each reads one line from the current session, without its CRLF):
//! - `S: TEXT` the line must equal TEXT, except that `{{RE}}` parts are regular expressions
//!   (`S: * OK [UIDVALIDITY {{\d+}}] UIDs valid`).
//! - `S~: RE` the whole line must match the regular expression RE.
//! - `S&: TEXT` / `S&~: RE`: consecutive `S&` lines form a group that must match the next lines
//!   in any order.
//! - `S*:` before an expectation: untagged lines (`* ...`) that do not match it are skipped.
//!
//! Literals the server sends are matched line by line as they appear on the wire. Regular
//! expressions are those of regex-automata's DFA: no captures or look-around; `\b` must be
//! written `(?-u:\b)`.
//!
//! Directives:
//! - `@session NAME [tls|plain] [USER]` switches to session NAME, connecting it first if it is
//!   new: `tls` is implicit TLS (993), `plain` the STARTTLS port (143). With USER the runner reads
//!   the greeting, does STARTTLS on `plain`, and logs in as USER. Without `@session` the first
//!   step opens session `main`.
//! - `@tls` / `@plain` sets the transport of sessions opened later without one (default `tls`).
//! - `@starttls` does the client's TLS handshake on the current session (after the dialogue's
//!   own `STARTTLS` and its `OK`).
//! - `@closed` the server must close the connection (after the lines an `S*:` lets through).
//! - `@quiet MS` the server must send nothing for MS milliseconds.
//! - `@deliver USER FILE` delivers FILE (relative to `tests/imap/`) to USER over SMTP;
//!   `@message USER ID` delivers a generated message with `Subject: test ID` (tests/common
//!   `message`). The SMTP 250 comes after the message is stored.
//! - `@sleep MS`, `@timeout SECS` (how long to wait for a server line; default 5).
//! - `@expect-fail REASON` ... `@end`: a known gap where the server is not yet what the RFC
//!   says. The first failing step inside is recorded as the gap, the rest of the block is
//!   skipped, pending input of every session is drained, and the run goes on after `@end` (or
//!   stops at the end of the file without one). A block that passes fails the file: the gap is
//!   fixed, remove the marker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use regex_automata::dfa::{dense, Automaton};
use regex_automata::Input;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/imap");
/// Files played at once (each with its own node).
const PARALLEL: usize = 4;

#[test]
fn dialogues() {
    let filter = std::env::var("DIALOGUE").unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .expect("tests/imap")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dialogue"))
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(&filter))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tests/imap/*.dialogue file matches {filter:?}");
    let queue = Arc::new(Mutex::new(files.clone()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..PARALLEL.min(files.len()))
        .map(|_| {
            let (queue, results) = (queue.clone(), results.clone());
            std::thread::spawn(move || loop {
                let Some(file) = queue.lock().unwrap().pop() else { break };
                let started = Instant::now();
                let r = std::panic::catch_unwind(|| play_file(&file))
                    .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
                results.lock().unwrap().push((file, r, started.elapsed()));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let mut failures = Vec::new();
    for (file, r, took) in &results {
        let name = file.file_name().unwrap().to_string_lossy();
        match r {
            Ok(gaps) => {
                println!("ok   {name} ({:.1} s, {} known gap(s))", took.as_secs_f64(), gaps.len());
                for g in gaps {
                    println!("     known gap: {g}");
                }
            }
            Err(e) => {
                println!("FAIL {name} ({:.1} s)", took.as_secs_f64());
                failures.push(format!("==== {name}\n{e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dialogue(s) failed:\n\n{}",
        failures.len(),
        results.len(),
        failures.join("\n\n")
    );
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The format.

#[derive(Clone)]
struct Matcher {
    /// As written in the file, for messages.
    text: String,
    kind: MatchKind,
}

#[derive(Clone)]
enum MatchKind {
    Exact,
    Regex(Arc<dense::DFA<Vec<u32>>>),
}

impl Matcher {
    fn exact(text: &str) -> Result<Matcher, String> {
        if !text.contains("{{") {
            return Ok(Matcher { text: text.to_string(), kind: MatchKind::Exact });
        }
        let mut re = String::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            re.push_str(&escape(&rest[..open]));
            let close = rest[open..].find("}}").ok_or("`{{` without `}}`")? + open;
            re.push_str("(?:");
            re.push_str(&rest[open + 2..close]);
            re.push(')');
            rest = &rest[close + 2..];
        }
        re.push_str(&escape(rest));
        Matcher::build(text, &re)
    }

    fn regex(re: &str) -> Result<Matcher, String> {
        Matcher::build(re, re)
    }

    fn build(text: &str, re: &str) -> Result<Matcher, String> {
        let dfa = dense::DFA::new(&format!("^(?:{re})$")).map_err(|e| format!("bad regular expression {re:?}: {e}"))?;
        Ok(Matcher { text: text.to_string(), kind: MatchKind::Regex(Arc::new(dfa)) })
    }

    fn matches(&self, line: &str) -> bool {
        match &self.kind {
            MatchKind::Exact => line == self.text,
            MatchKind::Regex(dfa) => matches!(dfa.try_search_fwd(&Input::new(line)), Ok(Some(_))),
        }
    }
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `\r \n \t \0 \\ \xNN`.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = *b.get(i + 1).ok_or("trailing backslash")?;
        i += 2;
        out.push(match c {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' => {
                let hex = s.get(i..i + 2).ok_or("short \\x escape")?;
                i += 2;
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x escape {hex:?}"))?
            }
            c => return Err(format!("unknown escape \\{}", c as char)),
        });
    }
    Ok(out)
}

enum Step {
    Send(Vec<u8>),
    Expect(Matcher),
    /// Lines of an `S&` group, each with its line number.
    AnyOrder(Vec<(usize, Matcher)>),
    SkipUntagged,
    Session {
        name: String,
        tls: Option<bool>,
        user: Option<String>,
    },
    DefaultTls(bool),
    StartTls,
    Closed,
    Quiet(u64),
    Deliver {
        user: String,
        body: String,
    },
    Sleep(u64),
    Timeout(f64),
    ExpectFail(String),
    End,
}

fn parse(text: &str) -> Result<Vec<(usize, Step)>, String> {
    let mut steps: Vec<(usize, Step)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let err = |e: String| format!("line {n}: {e}");
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        let step = if let Some(d) = raw.strip_prefix('@') {
            let words: Vec<&str> = d.split_whitespace().collect();
            let arg =
                |k: usize| words.get(k).copied().ok_or_else(|| err(format!("@{} needs more arguments", words[0])));
            let num = |k: usize| -> Result<f64, String> { arg(k)?.parse().map_err(|_| err("not a number".into())) };
            match words[0] {
                "session" => {
                    let (mut tls, mut user) = (None, None);
                    for w in &words[2..] {
                        match *w {
                            "tls" => tls = Some(true),
                            "plain" => tls = Some(false),
                            u if u.contains('@') => user = Some(u.to_string()),
                            w => return Err(err(format!("unknown @session argument {w:?}"))),
                        }
                    }
                    Step::Session { name: arg(1)?.to_string(), tls, user }
                }
                "tls" => Step::DefaultTls(true),
                "plain" => Step::DefaultTls(false),
                "starttls" => Step::StartTls,
                "closed" => Step::Closed,
                "quiet" => Step::Quiet(num(1)? as u64),
                "sleep" => Step::Sleep(num(1)? as u64),
                "timeout" => Step::Timeout(num(1)?),
                "deliver" => {
                    let path = Path::new(DIR).join(arg(2)?);
                    let body = std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
                    Step::Deliver { user: arg(1)?.to_string(), body: smtp_body(&body) }
                }
                "message" => {
                    let user = arg(1)?;
                    Step::Deliver { user: user.to_string(), body: message(arg(2)?, user) }
                }
                "expect-fail" => {
                    let reason = d["expect-fail".len()..].trim();
                    if reason.is_empty() {
                        return Err(err("@expect-fail needs a reason".into()));
                    }
                    Step::ExpectFail(reason.to_string())
                }
                "end" => Step::End,
                w => return Err(err(format!("unknown directive @{w}"))),
            }
        } else {
            let (prefix, rest) = raw.split_once(':').ok_or_else(|| err(format!("not a step: {raw:?}")))?;
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match prefix {
                "C" => Step::Send(format!("{rest}\r\n").into_bytes()),
                "C+" => Step::Send(rest.as_bytes().to_vec()),
                "C=" => Step::Send(unescape(rest).map_err(err)?),
                "C#" => {
                    let (count, text) = rest.split_once(' ').ok_or_else(|| err("C#: N TEXT".into()))?;
                    let count: usize = count.parse().map_err(|_| err("C#: N TEXT".into()))?;
                    Step::Send(text.repeat(count).into_bytes())
                }
                "S" => Step::Expect(Matcher::exact(rest).map_err(err)?),
                "S~" => Step::Expect(Matcher::regex(rest).map_err(err)?),
                "S&" | "S&~" => {
                    let m = if prefix == "S&" { Matcher::exact(rest) } else { Matcher::regex(rest) }.map_err(err)?;
                    if let Some((_, Step::AnyOrder(group))) = steps.last_mut() {
                        group.push((n, m));
                        continue;
                    }
                    Step::AnyOrder(vec![(n, m)])
                }
                "S*" => Step::SkipUntagged,
                p => return Err(err(format!("unknown step {p}:"))),
            }
        };
        steps.push((n, step));
    }
    Ok(steps)
}

/// A message file as SMTP DATA: CRLF line ends, dot-stuffed, ending in CRLF.
fn smtp_body(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The client.

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Gone,
}

enum ReadErr {
    Timeout,
    /// Closed, with any partial line that came before.
    Eof(Vec<u8>),
    Io(String),
}

struct Client {
    name: String,
    stream: Stream,
    buf: Vec<u8>,
    /// The recent exchange, for failure messages.
    log: Vec<String>,
}

fn tls_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

impl Client {
    fn connect(name: &str, node: &Node, tls: bool) -> Result<Client, String> {
        let addr = if tls { node.imaps } else { node.imap };
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut c = Client { name: name.to_string(), stream: Stream::Plain(tcp), buf: Vec::new(), log: Vec::new() };
        if tls {
            c.tls(node)?;
        }
        Ok(c)
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Plain(t) => Some(t),
            Stream::Tls(s) => Some(&s.sock),
            Stream::Gone => None,
        }
    }

    fn tls(&mut self, node: &Node) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("data after the server's STARTTLS reply, before TLS: {}", show(&self.buf)));
        }
        let Stream::Plain(mut tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err("TLS is already active".into());
        };
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(tls_config(&node.cert), name).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| format!("TLS handshake: {e}"))?;
        }
        self.stream = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)));
        self.log.push("(TLS established)".into());
        Ok(())
    }

    fn send(&mut self, data: &[u8]) -> Result<(), String> {
        let shown =
            if data.len() > 120 { format!("{}... ({} bytes)", show(&data[..100]), data.len()) } else { show(data) };
        self.log.push(format!("C: {shown}"));
        let r = match &mut self.stream {
            Stream::Plain(t) => t.write_all(data).and_then(|_| t.flush()),
            Stream::Tls(s) => s.write_all(data).and_then(|_| s.flush()),
            Stream::Gone => return Err("the connection is closed".into()),
        };
        r.map_err(|e| format!("write: {e}"))
    }

    fn read_line(&mut self, timeout: Duration) -> Result<Vec<u8>, ReadErr> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.log.push(format!("S: {}", show(&line)));
                return Ok(line);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadErr::Timeout);
            }
            let Some(tcp) = self.tcp() else { return Err(ReadErr::Eof(std::mem::take(&mut self.buf))) };
            tcp.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            let mut chunk = [0u8; 16384];
            let r = match &mut self.stream {
                Stream::Plain(t) => t.read(&mut chunk),
                Stream::Tls(s) => s.read(&mut chunk),
                Stream::Gone => unreachable!(),
            };
            match r {
                Ok(0) => return Err(self.eof()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ReadErr::Timeout)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(self.eof())
                }
                Err(e) => return Err(ReadErr::Io(e.to_string())),
            }
        }
    }

    fn eof(&mut self) -> ReadErr {
        self.stream = Stream::Gone;
        self.log.push("(closed by the server)".into());
        ReadErr::Eof(std::mem::take(&mut self.buf))
    }

    /// Reads and drops whatever arrives until `quiet` passes without data.
    fn drain(&mut self, quiet: Duration) {
        while let Ok(_) | Err(ReadErr::Eof(_)) = self.read_line(quiet) {
            if matches!(self.stream, Stream::Gone) {
                break;
            }
        }
        self.buf.clear();
    }

    fn recent(&self) -> String {
        let keep = if std::env::var_os("DIALOGUE_VERBOSE").is_some() { usize::MAX } else { 25 };
        let from = self.log.len().saturating_sub(keep);
        self.log[from..].iter().map(|l| format!("    [{}] {l}\n", self.name)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Playing a file.

struct Block {
    line: usize,
    reason: String,
    failed: Option<String>,
}

struct Player<'a> {
    node: &'a Node,
    sessions: Vec<Client>,
    current: Option<usize>,
    default_tls: bool,
    skip_untagged: bool,
    timeout: Duration,
}

fn play_file(path: &Path) -> Result<Vec<String>, String> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let steps = parse(&text).map_err(|e| format!("{name}: {e}"))?;
    let node = Node::start(Setup::default());
    let mut p = Player {
        node: &node,
        sessions: Vec::new(),
        current: None,
        default_tls: true,
        skip_untagged: false,
        timeout: Duration::from_secs(5),
    };
    let mut gaps = Vec::new();
    let mut block: Option<Block> = None;
    let close_block = |b: Block, p: &mut Player, gaps: &mut Vec<String>| -> Result<(), String> {
        match b.failed {
            Some(f) => {
                for s in &mut p.sessions {
                    s.drain(Duration::from_millis(200));
                }
                p.skip_untagged = false;
                gaps.push(format!(
                    "{name}:{}: {}\n       {}",
                    b.line,
                    b.reason,
                    f.trim_end().replace('\n', "\n       ")
                ));
                Ok(())
            }
            None => Err(format!(
                "{name}:{}: the block marked @expect-fail ({}) passes now: remove the marker",
                b.line, b.reason
            )),
        }
    };
    for (line, step) in &steps {
        match step {
            Step::ExpectFail(reason) => {
                if let Some(b) = &block {
                    return Err(format!("{name}:{line}: @expect-fail inside the block of line {}", b.line));
                }
                block = Some(Block { line: *line, reason: reason.clone(), failed: None });
                continue;
            }
            Step::End => {
                let b = block.take().ok_or_else(|| format!("{name}:{line}: @end without @expect-fail"))?;
                close_block(b, &mut p, &mut gaps)?;
                continue;
            }
            _ => {}
        }
        if block.as_ref().is_some_and(|b| b.failed.is_some()) {
            continue;
        }
        if let Err(e) = p.step(step) {
            let context = p.current.map(|c| p.sessions[c].recent()).unwrap_or_default();
            match &mut block {
                Some(b) => b.failed = Some(format!("line {line}: {e}")),
                None => {
                    return Err(format!(
                        "{name}:{line}: {e}\n  recent exchange:\n{context}  server log (tail):\n{}",
                        log_tail(&node.log(), 30)
                    ))
                }
            }
        }
    }
    if let Some(b) = block.take() {
        close_block(b, &mut p, &mut gaps)?;
    }
    if std::env::var_os("DIALOGUE_VERBOSE").is_some() {
        let all: String =
            p.sessions.iter().flat_map(|s| s.log.iter().map(|l| format!("  [{}] {l}\n", s.name))).collect();
        println!("---- {name}\n{all}");
    }
    Ok(gaps)
}

fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}\n")).collect()
}

impl Player<'_> {
    fn client(&mut self) -> Result<&mut Client, String> {
        if self.current.is_none() {
            self.open("main", self.default_tls, None)?;
        }
        Ok(&mut self.sessions[self.current.unwrap()])
    }

    fn open(&mut self, name: &str, tls: bool, user: Option<&str>) -> Result<(), String> {
        self.sessions.push(Client::connect(name, self.node, tls)?);
        self.current = Some(self.sessions.len() - 1);
        let Some(user) = user else { return Ok(()) };
        let (timeout, node) = (self.timeout, self.node);
        let c = self.client()?;
        let greeting = c.read_line(timeout).map_err(|e| read_err("the greeting", e))?;
        if !greeting.starts_with(b"* OK") {
            return Err(format!("greeting: {}", show(&greeting)));
        }
        if !tls {
            command(c, "zs STARTTLS", timeout)?;
            c.tls(node)?;
        }
        command(c, &format!("zl LOGIN {user} {PASSWORD}"), timeout)
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        let timeout = self.timeout;
        match step {
            Step::Send(data) => self.client()?.send(data),
            Step::Expect(m) => {
                let skip = std::mem::take(&mut self.skip_untagged);
                let c = self.client()?;
                let mut skipped = Vec::new();
                loop {
                    let line = c.read_line(timeout).map_err(|e| expected(m, &skipped, e))?;
                    let text = String::from_utf8_lossy(&line);
                    if m.matches(&text) {
                        return Ok(());
                    }
                    if !(skip && line.starts_with(b"* ")) {
                        return Err(format!(
                            "expected {}\n  got      {}{}",
                            m.text,
                            show(&line),
                            skipped_note(&skipped)
                        ));
                    }
                    skipped.push(show(&line));
                }
            }
            Step::AnyOrder(group) => {
                let skip = std::mem::take(&mut self.skip_untagged);
                let c = self.client()?;
                let mut left: Vec<&(usize, Matcher)> = group.iter().collect();
                let mut skipped = Vec::new();
                while !left.is_empty() {
                    let want = || left.iter().map(|(n, m)| format!("\n    (line {n}) {}", m.text)).collect::<String>();
                    let line = match c.read_line(timeout) {
                        Ok(l) => l,
                        Err(e) => return Err(format!("{} while expecting, in any order:{}", read_err("", e), want())),
                    };
                    let text = String::from_utf8_lossy(&line);
                    if let Some(i) = left.iter().position(|(_, m)| m.matches(&text)) {
                        left.remove(i);
                    } else if skip && line.starts_with(b"* ") {
                        skipped.push(show(&line));
                    } else {
                        return Err(format!(
                            "got {}\n  expected one of:{}{}",
                            show(&line),
                            want(),
                            skipped_note(&skipped)
                        ));
                    }
                }
                Ok(())
            }
            Step::SkipUntagged => {
                self.skip_untagged = true;
                Ok(())
            }
            Step::Closed => {
                let skip = std::mem::take(&mut self.skip_untagged);
                let c = self.client()?;
                loop {
                    match c.read_line(timeout) {
                        Ok(l) if skip && l.starts_with(b"* ") => {}
                        Ok(l) => return Err(format!("expected the connection to close\n  got      {}", show(&l))),
                        Err(ReadErr::Eof(rest)) if rest.is_empty() => return Ok(()),
                        Err(ReadErr::Eof(rest)) => {
                            return Err(format!("closed after a partial line: {}", show(&rest)));
                        }
                        Err(e) => return Err(read_err("the connection to close", e)),
                    }
                }
            }
            Step::Quiet(ms) => match self.client()?.read_line(Duration::from_millis(*ms)) {
                Err(ReadErr::Timeout) => Ok(()),
                Ok(l) => Err(format!("expected nothing for {ms} ms\n  got      {}", show(&l))),
                Err(e) => Err(read_err(&format!("nothing for {ms} ms"), e)),
            },
            Step::Session { name, tls, user } => {
                if let Some(i) = self.sessions.iter().position(|s| &s.name == name) {
                    self.current = Some(i);
                    return Ok(());
                }
                self.open(name, tls.unwrap_or(self.default_tls), user.as_deref())
            }
            Step::DefaultTls(t) => {
                self.default_tls = *t;
                Ok(())
            }
            Step::StartTls => {
                let node = self.node;
                self.client()?.tls(node)
            }
            Step::Deliver { user, body } => {
                let (code, text) = send_message(self.node, "sender@peer.test", &[user], body);
                if code != 250 {
                    return Err(format!("SMTP delivery to {user}: {text}"));
                }
                Ok(())
            }
            Step::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(*ms));
                Ok(())
            }
            Step::Timeout(s) => {
                self.timeout = Duration::from_secs_f64(*s);
                Ok(())
            }
            Step::ExpectFail(_) | Step::End => unreachable!("handled by play_file"),
        }
    }
}

/// Sends `line` and reads to its tagged reply, which must be OK.
fn command(c: &mut Client, line: &str, timeout: Duration) -> Result<(), String> {
    let tag = line.split(' ').next().unwrap();
    c.send(format!("{line}\r\n").as_bytes())?;
    loop {
        let l = c.read_line(timeout).map_err(|e| read_err(&format!("the reply to {line}"), e))?;
        if l.starts_with(format!("{tag} ").as_bytes()) {
            if l.starts_with(format!("{tag} OK").as_bytes()) {
                return Ok(());
            }
            return Err(format!("{line}: {}", show(&l)));
        }
    }
}

fn read_err(what: &str, e: ReadErr) -> String {
    let what = if what.is_empty() { String::new() } else { format!(" while waiting for {what}") };
    match e {
        ReadErr::Timeout => format!("timed out{what}"),
        ReadErr::Eof(rest) if rest.is_empty() => format!("the server closed the connection{what}"),
        ReadErr::Eof(rest) => format!("the server closed the connection{what}, after a partial line {}", show(&rest)),
        ReadErr::Io(e) => format!("read error{what}: {e}"),
    }
}

fn expected(m: &Matcher, skipped: &[String], e: ReadErr) -> String {
    format!("expected {}\n  got      nothing: {}{}", m.text, read_err("", e), skipped_note(skipped))
}

fn skipped_note(skipped: &[String]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    format!("\n  after skipping:\n{}", skipped.iter().map(|s| format!("    {s}\n")).collect::<String>())
}

#[test]
fn format_errors_are_reported() {
    assert!(parse("X: nope").is_err());
    assert!(parse("@bogus").is_err());
    assert!(parse("S~: (unclosed").is_err());
    assert!(parse("S: {{x").is_err());
    assert!(parse("@expect-fail").is_err());
    let m = Matcher::exact("* OK [UIDVALIDITY {{\\d+}}] (x)").unwrap();
    assert!(m.matches("* OK [UIDVALIDITY 123] (x)"));
    assert!(!m.matches("* OK [UIDVALIDITY 12a] (x)"));
    assert!(!m.matches("* OK [UIDVALIDITY 123] (x) "));
    assert_eq!(unescape("a\\r\\n\\x7b\\\\").unwrap(), b"a\r\n{\\");
    let steps = parse("S&: a\nS&~: b+\nS: c").unwrap();
    assert!(matches!(&steps[0].1, Step::AnyOrder(g) if g.len() == 2));
}
