//! FETCH parity with Dovecot (issue 3): every message of `tests/imap_corpus/messages` goes into a
//! node's INBOX in file order (UID n = n-th file), then every command recorded in
//! `tests/imap_corpus/dovecot/NN-name.txt` is sent to the node over IMAPS and the untagged
//! response compared with Dovecot 2.3.19's, byte for byte.
//!
//! Storage: the messages are committed to the store in-process (no APPEND yet) with Dovecot's
//! INTERNALDATE (`01-Jan-2025 00:00:00 +0000`), byte for byte, except that a bare LF is stored as
//! CRLF. Dovecot does the same in effect (it serves 26-bare-lf with CRLF and counts every size on
//! the CRLF form); Postern serves stored bytes as they are, so it converts when storing. SMTP
//! never stores bare LF (it refuses it), and APPEND should convert the same way.
//!
//! Normalisation: none beyond the tag. Responses are compared from `* ` to the end, literals
//! included; a non-OK tagged reply is compared as `TAG <status> <text>` like the reference file.
//!
//! Not compared: commands in `UNSUPPORTED` when Postern answers them BAD (listed in the output,
//! with the reason), and the (message, command) pairs in `ALLOWLIST`, where Postern deliberately
//! differs from Dovecot. Postern's responses are written to `CARGO_TARGET_TMPDIR/imap_dovecot/`
//! in the reference format, for diffing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use postern::store::{DeliveryTarget, Flags};

const USER: &str = "alice@example.test";
/// `01-Jan-2025 00:00:00 +0000`, the INTERNALDATE the reference script APPENDs with.
const INTERNAL_DATE: i64 = 1_735_689_600;

/// Command prefixes Postern may not implement yet; they are skipped (not compared) only while
/// Postern answers them BAD.
const UNSUPPORTED: &[(&str, &str)] = &[];

/// (message file prefix, command with `*` for the UID, why Postern differs from Dovecot).
const ALLOWLIST: &[(&str, &str, &str)] = &[(
    "23-",
    "UID FETCH * (BINARY.SIZE[2])",
    "CTE `Base64` is base64 (RFC 2045 §6.1: case-insensitive); Dovecot's BINARY.SIZE says UNKNOWN-CTE \
     though its BINARY.PEEK decodes the part",
)];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/imap_corpus")
}

/// LF not preceded by CR becomes CRLF.
fn to_crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 20);
    for (i, &c) in raw.iter().enumerate() {
        if c == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}

/// A CRLF line of a response; when it announces a literal (`{n}` or `~{n}`), the literal and
/// the rest of the logical line follow, so one call returns one logical line.
fn logical_line(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let start = out.len();
        if r.read_until(b'\n', &mut out).ok()? == 0 {
            return (!out.is_empty()).then_some(out);
        }
        let line = &out[start..];
        let Some(n) = literal_len(line) else { return Some(out) };
        let at = out.len();
        out.resize(at + n, 0);
        r.read_exact(&mut out[at..]).ok()?;
    }
}

fn literal_len(line: &[u8]) -> Option<usize> {
    let l = line.strip_suffix(b"}\r\n")?;
    let open = l.iter().rposition(|&c| c == b'{')?;
    std::str::from_utf8(&l[open + 1..]).ok()?.parse().ok()
}

struct Record {
    command: String,
    response: Vec<u8>,
}

fn reference(path: &Path) -> Vec<Record> {
    let data = std::fs::read(path).unwrap();
    let mut r = &data[..];
    let mut records: Vec<Record> = Vec::new();
    while let Some(line) = logical_line(&mut r) {
        if let Some(cmd) = line.strip_prefix(b">> ") {
            let cmd = String::from_utf8(cmd.to_vec()).unwrap();
            records.push(Record { command: cmd.trim_end().to_string(), response: Vec::new() });
        } else {
            records.last_mut().expect("record before response").response.extend_from_slice(&line);
        }
    }
    records
}

/// `UID FETCH 6 (BODY)` → `UID FETCH * (BODY)`.
fn generic(command: &str, uid: usize) -> String {
    command.replacen(&format!("UID FETCH {uid} "), "UID FETCH * ", 1)
}

struct Client {
    r: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    n: u32,
}

impl Client {
    fn connect(node: &Node) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&node.cert).unwrap();
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(node.imaps).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Client { r: BufReader::new(rustls::StreamOwned::new(conn, tcp)), n: 0 };
        let greeting = logical_line(&mut c.r).expect("greeting");
        assert!(greeting.starts_with(b"* OK"), "{}", String::from_utf8_lossy(&greeting));
        c
    }

    /// Sends a command; returns the untagged lines and the tagged line (tag replaced by `TAG`).
    fn command(&mut self, cmd: &str) -> (Vec<u8>, Vec<u8>) {
        self.n += 1;
        let tag = format!("t{}", self.n);
        let s = self.r.get_mut();
        s.write_all(format!("{tag} {cmd}\r\n").as_bytes()).unwrap();
        s.flush().unwrap();
        let mut untagged = Vec::new();
        loop {
            let line = logical_line(&mut self.r).unwrap_or_else(|| panic!("connection closed after {cmd}"));
            if let Some(rest) = line.strip_prefix(format!("{tag} ").as_bytes()) {
                return (untagged, [b"TAG ", rest].concat());
            }
            untagged.extend_from_slice(&line);
        }
    }
}

fn store_corpus(node: &mut Node, files: &[PathBuf]) {
    node.stop();
    let store = open_store(&node.data_dir());
    for f in files {
        let raw = to_crlf(&std::fs::read(f).unwrap());
        let mut w = store.blob_writer().unwrap();
        w.write(&raw).unwrap();
        let blob = w.finish().unwrap();
        store.commit_message(blob, &[DeliveryTarget::inbox(USER)], Flags::default(), &[], INTERNAL_DATE, 0).unwrap();
    }
    store.sync_blocking().unwrap();
    drop(store);
    node.launch();
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace('\r', "\\r")
}

#[test]
fn fetch_matches_dovecot() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus().join("messages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 37);
    let mut node = Node::start(Setup::default());
    store_corpus(&mut node, &files);

    let mut c = Client::connect(&node);
    assert!(c.command(&format!("LOGIN {USER} {PASSWORD}")).1.starts_with(b"TAG OK"));
    let (_, ok) = c.command("EXAMINE INBOX");
    assert!(ok.starts_with(b"TAG OK"), "{}", show(&ok));

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("imap_dovecot");
    std::fs::create_dir_all(&out_dir).unwrap();
    let (mut total, mut matched) = (0, 0);
    let (mut skipped, mut allowed, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    let mut allow_used = vec![false; ALLOWLIST.len()];
    for (i, f) in files.iter().enumerate() {
        let uid = i + 1;
        let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
        let mut ours = Vec::new();
        for rec in reference(&corpus().join("dovecot").join(format!("{stem}.txt"))) {
            let (untagged, tagged) = c.command(&rec.command);
            let mut got = untagged;
            if !tagged.starts_with(b"TAG OK") {
                got.extend_from_slice(&tagged);
            }
            ours.extend_from_slice(format!(">> {}\r\n", rec.command).as_bytes());
            ours.extend_from_slice(&got);
            let generic = generic(&rec.command, uid);
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(p, _)| generic.starts_with(p)) {
                if tagged.starts_with(b"TAG BAD") {
                    skipped.push(format!("{stem}: {} ({why})", rec.command));
                    continue;
                }
            }
            total += 1;
            if let Some(k) = ALLOWLIST.iter().position(|(m, cmd, _)| stem.starts_with(m) && generic == *cmd) {
                allow_used[k] = true;
                if got == rec.response {
                    failures.push(format!("{stem}: {}: on the allowlist but matches Dovecot", rec.command));
                } else {
                    allowed.push(format!("{stem}: {} ({})", rec.command, ALLOWLIST[k].2));
                }
                continue;
            }
            if got == rec.response {
                matched += 1;
            } else {
                failures.push(format!(
                    "{stem}: {}\n  dovecot: {}\n  postern: {}",
                    rec.command,
                    show(&rec.response),
                    show(&got)
                ));
            }
        }
        std::fs::write(out_dir.join(format!("{stem}.txt")), ours).unwrap();
    }
    for (k, used) in allow_used.iter().enumerate() {
        if !used {
            failures.push(format!("allowlist entry {:?} matched no command", ALLOWLIST[k]));
        }
    }
    println!("parity: {matched} of {total} (message, command) pairs match Dovecot byte for byte");
    println!("allowlisted ({}):", allowed.len());
    for a in &allowed {
        println!("  {a}");
    }
    println!("skipped, unsupported ({}):", skipped.len());
    for s in &skipped {
        println!("  {s}");
    }
    println!("Postern's responses: {}", out_dir.display());
    assert!(failures.is_empty(), "{} differences from Dovecot:\n{}", failures.len(), failures.join("\n"));
}
