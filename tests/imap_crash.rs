//! The server killed (SIGKILL) in the middle of an IMAP APPEND: a message whose OK was sent
//! survives byte for byte; a message still arriving, or a MULTIAPPEND cut between its messages,
//! leaves nothing behind — no partial message, no orphaned body chunks.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// Runs `script` (with `python_program`'s prelude) until it prints `READY`, then kills the
/// server with SIGKILL, then the script. Returns what the script printed before.
fn kill_when_ready(node: &mut Node, script: &str) -> Vec<String> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(python_program(node, script))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read python output");
        assert!(n > 0, "script ended before READY: {lines:?}\nserver log:\n{}", node.log());
        if line.trim() == "READY" {
            break;
        }
        lines.push(line.trim().to_string());
    }
    node.kill9();
    let _ = child.kill();
    let _ = child.wait();
    lines
}

fn orphan_check(node: &mut Node) {
    node.stop();
    let store = open_store(&node.data_dir());
    let acct = store.account_id("alice@example.test").unwrap().expect("account");
    let mut held = 0;
    for m in store.list_mailboxes(acct).unwrap() {
        held += store.entries(acct, m.id).unwrap().len();
    }
    let (blobs, _chunks) = store.blob_counts().unwrap();
    assert_eq!(blobs, held, "every stored body belongs to a message");
    drop(store);
}

const PARTIAL: &str = r#"
import socket
m = login('alice@example.test')
body = b'Subject: big\r\n\r\n' + b'0123456789abcdef' * 65536 + b'\r\n'
# Announce the whole literal, send half of it, and stop: the server is mid-APPEND.
m.send(b'A1 APPEND INBOX {%d+}\r\n' % len(body))
m.send(body[: len(body) // 2])
import time
time.sleep(0.5)
print('READY', flush=True)
time.sleep(30)
"#;

#[test]
fn kill_during_append_leaves_no_partial_message() {
    let mut node = Node::start(Setup::default());
    // One message safely stored first, so the account exists and has something to keep.
    let out = python_imap(
        &node,
        "m = login('alice@example.test')\nprint(m.append('INBOX', '(\\\\Flagged)', None, b'Subject: kept\\r\\n\\r\\nkept\\r\\n')[0])\n",
    );
    assert_eq!(out.trim(), "OK");
    kill_when_ready(&mut node, PARTIAL);
    node.launch();
    let msgs = inbox(&node, "alice@example.test");
    assert_eq!(msgs.len(), 1, "only the acknowledged message");
    assert_eq!(msgs[0], b"Subject: kept\r\n\r\nkept\r\n");
    orphan_check(&mut node);
}

#[test]
fn acknowledged_append_survives_an_immediate_kill() {
    let mut node = Node::start(Setup::default());
    let script = r#"
m = login('alice@example.test')
body = b'Subject: durable\r\n\r\n' + bytes(range(32, 127)) * 20000 + b'\r\n'
typ, data = m.append('INBOX', '(\\Seen $Important)', '"21-Nov-2026 10:00:00 +0100"', body)
print(typ, data[0].decode())
print('READY', flush=True)
import time
time.sleep(30)
"#;
    let lines = kill_when_ready(&mut node, script);
    assert!(lines[0].starts_with("OK [APPENDUID"), "{lines:?}");
    node.launch();
    let out = python_imap(
        &node,
        "m = login('alice@example.test')\nm.select('INBOX', readonly=True)\n\
         typ, data = m.fetch('1:*', '(FLAGS INTERNALDATE RFC822.SIZE)')\nprint(data)\n",
    );
    assert!(out.contains("\\Seen") && out.contains("$Important"), "{out}");
    assert!(out.contains("21-Nov-2026 10:00:00 +0100"), "{out}");
    let msgs = inbox(&node, "alice@example.test");
    assert_eq!(msgs.len(), 1);
    let mut want = b"Subject: durable\r\n\r\n".to_vec();
    want.extend((32u8..127).cycle().take(95 * 20000));
    want.extend_from_slice(b"\r\n");
    assert!(msgs[0] == want, "body differs after the crash");
    orphan_check(&mut node);
}

#[test]
fn kill_between_multiappend_messages_stores_none() {
    let mut node = Node::start(Setup::default());
    let script = r#"
m = login('alice@example.test')
one = b'Subject: one\r\n\r\none\r\n'
two = b'Subject: two\r\n\r\n' + b'z' * 500000 + b'\r\n'
# RFC 3502: all the messages of one MULTIAPPEND or none. The first is complete when we stop.
m.send(b'A1 APPEND INBOX {%d+}\r\n' % len(one) + one + b' {%d+}\r\n' % len(two) + two[:1000])
import time
time.sleep(0.5)
print('READY', flush=True)
time.sleep(30)
"#;
    kill_when_ready(&mut node, script);
    node.launch();
    assert!(inbox(&node, "alice@example.test").is_empty());
    orphan_check(&mut node);
}
