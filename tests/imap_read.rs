//! The IMAP read path on the real binary: Python imaplib and mbsync read what SMTP delivered,
//! two sessions see each other's changes, and hostile input gets its answer.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn deliver(node: &Node, n: usize, to: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let msg = message(&format!("m{i}"), to);
            assert_eq!(send_message(node, "sender@peer.test", &[to], &msg).0, 250);
            unstuffed(&msg)
        })
        .collect()
}

#[test]
fn imaplib_reads_flags_and_expunges() {
    let node = Node::start(Setup::default());
    deliver(&node, 3, "alice@example.test");
    let out = python_imap(
        &node,
        r#"
# Port 143 without TLS: LOGINDISABLED, and LOGIN refused.
p = imaplib.IMAP4(HOST, PORT143)
caps = p.capabilities
assert 'LOGINDISABLED' in caps and 'STARTTLS' in caps, caps
try:
    p.login('alice@example.test', PASSWORD)
    raise SystemExit('login before TLS was accepted')
except imaplib.IMAP4.error:
    pass
p.starttls(ssl_context=tls())
p.login('alice@example.test', PASSWORD)
p.logout()
# A wrong password is refused.
try:
    imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls()).login('alice@example.test', 'wrong')
    raise SystemExit('wrong password accepted')
except imaplib.IMAP4.error:
    pass
# AUTHENTICATE PLAIN (RFC 4616) works as well as LOGIN.
a = imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls())
typ, _ = a.authenticate('PLAIN', lambda _: b'\0alice@example.test\0' + PASSWORD.encode())
assert typ == 'OK'
a.logout()
m = login('alice@example.test')
typ, boxes = m.list()
names = sorted(b.decode() for b in boxes)
assert any('\\Sent' in b and '"Sent"' in b for b in names), names
typ, data = m.select('INBOX')
assert data == [b'3'], data
typ, data = m.fetch('1:3', '(UID FLAGS RFC822.SIZE ENVELOPE)')
assert typ == 'OK' and len([d for d in data if d]) == 3, data
typ, data = m.fetch('2', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
assert data[0][1] == b'Subject: test m1\r\n\r\n', data
typ, data = m.fetch('2', '(BODY.PEEK[TEXT]<0.5>)')
assert data[0][1] == b'Hello', data
typ, data = m.fetch('1', '(FLAGS)')
assert b'\\Seen' not in data[0], data
m.fetch('1', '(BODY[])')          # not PEEK: sets \Seen
typ, data = m.fetch('1', '(FLAGS)')
assert b'\\Seen' in data[0], data
typ, data = m.store('2', '+FLAGS', '(\\Deleted $Label1)')
assert b'\\Deleted' in data[0] and b'$Label1' in data[0], data
typ, data = m.expunge()
assert data == [b'2'], data
typ, data = m.status('INBOX', '(MESSAGES UNSEEN UIDNEXT)')
assert b'MESSAGES 2' in data[0] and b'UNSEEN 1' in data[0] and b'UIDNEXT 4' in data[0], data
typ, data = m.uid('FETCH', '1:*', '(UID)')
assert data == [b'1 (UID 1)', b'2 (UID 3)'], data
m.create('Work/2026')
typ, boxes = m.list('""', 'Work*')
assert len(boxes) == 2 and b'HasChildren' in boxes[0], boxes
m.close()
m.logout()
print('ok')
"#,
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn two_sessions_see_each_others_changes() {
    let node = Node::start(Setup::default());
    deliver(&node, 2, "bob@example.test");
    // Session A keeps INBOX selected while B and SMTP change it.
    let script = r#"
a = login('bob@example.test'); a.select('INBOX')
b = login('bob@example.test'); b.select('INBOX')
b.store('1', '+FLAGS', '(\\Flagged)')
b.store('2', '+FLAGS', '(\\Deleted)'); b.expunge()
import subprocess
typ, data = a.noop()
# A sees the expunge of message 2 and the flag change of message 1.
assert b'2' in [x for x in a.untagged_responses.get('EXPUNGE', [])], a.untagged_responses
fetches = a.untagged_responses.get('FETCH', [])
assert any(b'\\Flagged' in f for f in fetches), a.untagged_responses
print('step1')
import sys; sys.stdout.flush()
line = sys.stdin.readline()   # the test delivers one more message now
typ, data = a.noop()
assert a.untagged_responses.get('EXISTS')[-1] == b'2', a.untagged_responses
# A mailbox deleted under a session that has it selected: BYE, as Dovecot does.
b.create('Scratch'); a.select('Scratch'); b.delete('Scratch')
try:
    a.noop()
    raise SystemExit('no BYE after the selected mailbox was deleted')
except imaplib.IMAP4.abort:
    pass
print('ok')
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(python_program(&node, script))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    if line.trim() != "step1" {
        let o = child.wait_with_output().unwrap();
        panic!("step1 failed: {line}{}", String::from_utf8_lossy(&o.stderr));
    }
    deliver(&node, 1, "bob@example.test");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    assert!(o.status.success() && rest.trim() == "ok", "{rest}{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn mbsync_pulls_into_a_maildir_byte_for_byte() {
    let node = Node::start(Setup::default());
    let sent = deliver(&node, 5, "alice@example.test");
    let home = node.dir.path().join("mbsync");
    let maildir = home.join("Mail");
    std::fs::create_dir_all(&maildir).unwrap();
    let rc = home.join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount test\nHost 127.0.0.1\nPort {}\nUser alice@example.test\nPass {PASSWORD}\nSSLType IMAPS\n\
             CertificateFile {}\n\nIMAPStore remote\nAccount test\n\nMaildirStore local\nPath {}/\nInbox {}/INBOX\n\n\
             Channel test\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n",
            node.imaps.port(),
            node.cert.display(),
            maildir.display(),
            maildir.display()
        ),
    )
    .unwrap();
    for _ in 0..2 {
        let out = Command::new("mbsync")
            .arg("-c")
            .arg(&rc)
            .arg("-a")
            .output()
            .expect("mbsync is installed by the test command");
        assert!(
            out.status.success(),
            "mbsync: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
    }
    let mut got: Vec<Vec<u8>> = std::fs::read_dir(maildir.join("INBOX/new"))
        .unwrap()
        .chain(std::fs::read_dir(maildir.join("INBOX/cur")).unwrap())
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(got.len(), 5, "the second run added nothing");
    got.sort_by_key(|m| String::from_utf8_lossy(m).find("Subject: test m").map(|i| m[i + 15]));
    // mbsync stores Maildir files with LF line ends and adds its X-TUID header.
    for (g, s) in got.iter().zip(&sent) {
        let g =
            String::from_utf8_lossy(g).lines().filter(|l| !l.starts_with("X-TUID: ")).collect::<Vec<_>>().join("\r\n");
        assert_eq!(strip_trace(format!("{g}\r\n").as_bytes()), s.as_bytes());
    }
}

#[test]
fn protocol_robustness() {
    let node = Node::start(Setup::default());
    let mut d = Dialog::connect(node.imap);
    assert!(d.line().starts_with("* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED]"));
    // A huge literal is refused without allocating it; the connection stays usable.
    d.send("a1 LOGIN {4000000000}");
    assert_eq!(d.line(), "a1 BAD Literal too large\r\n");
    d.send("a2 NOOP");
    assert_eq!(d.line(), "a2 OK NOOP completed\r\n");
    d.send("a3 SELECT INBOX");
    assert!(d.line().starts_with("a3 BAD"));
    d.send("a4 FROB");
    assert!(d.line().starts_with("a4 BAD"));
    d.send("a5 LOGIN alice@example.test");
    assert!(d.line().starts_with("a5 NO [PRIVACYREQUIRED]"));
    d.send(&format!("a6 NOOP {}", "(".repeat(200)));
    assert!(d.line().starts_with("a6 BAD"));
    d.send(&format!("a7 NOOP {}", "x".repeat(20_000)));
    assert_eq!(d.line(), "* BAD Command line too long\r\n");
    d.send_raw(b"\r\n");
    assert!(d.line().starts_with("* BAD"));
    d.send("a8 LOGOUT");
    assert!(d.line().starts_with("* BYE"));
    assert_eq!(d.line(), "a8 OK LOGOUT completed\r\n");
    // The server still serves others.
    let out = python_imap(&node, "m = login('alice@example.test'); print(m.select('INBOX')[0])");
    assert_eq!(out.trim(), "OK");
    let _ = Duration::from_secs(0);
}
