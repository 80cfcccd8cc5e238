//! QUOTA (RFC 9208): the configured per-user limit seen over IMAP with Python's imaplib, and
//! enforced on APPEND, COPY and SMTP delivery.

mod common;

use common::*;

/// carol@example.test has a 20 KiB quota; alice and bob none.
fn node() -> Node {
    let hash = postern::auth::hash_password(PASSWORD);
    Node::start(Setup {
        extra: format!("[users.\"carol@example.test\"]\npassword = \"{hash}\"\nquota = \"20KiB\"\n"),
        ..Setup::default()
    })
}

#[test]
fn imap_reports_and_enforces_the_quota() {
    let node = node();
    let out = python_imap(
        &node,
        r#"
def body(n):
    return b'From: a@example.test\r\nSubject: q\r\n\r\n' + b'x' * n + b'\r\n'
m = login('carol@example.test')
typ, caps = m.capability()
assert b'QUOTA' in caps[0].split() and b'QUOTA=RES-STORAGE' in caps[0].split(), caps
print(m.getquotaroot('INBOX'))
print(m.append('INBOX', None, None, body(8000))[0])
print(m.getquota('""'))
typ, data = m.append('INBOX', None, None, body(15000))
print(typ, data)
m.select('INBOX')
print(m.copy('1', 'Archive')[0])
typ, data = m.copy('1', 'Archive')
print(typ, data)
print(m.uid('MOVE', '1', 'Trash')[0])
print(m.getquota('""'))
typ, data = m._simple_command('SETQUOTA', '""', '(STORAGE 99999)')
print(typ)
a = login('alice@example.test')
print(a.getquotaroot('INBOX'))
typ, data = a.getquota('""')
print(typ, data)
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    // Empty account: STORAGE 0 of 20 KiB.
    assert_eq!(lines[0], r#"('OK', [[b'"INBOX" ""'], [b'"" (STORAGE 0 20)']])"#, "{out}");
    assert_eq!(lines[1], "OK", "{out}");
    assert!(lines[2].contains(r#"(STORAGE 8 20)"#), "{out}");
    // 8 KB + 15 KB > 20 KiB: refused, with the RFC 9208 response code.
    assert!(lines[3].starts_with("NO") && lines[3].contains("[OVERQUOTA]"), "{out}");
    // A copy fits once (16 KB), not twice.
    assert_eq!(lines[4], "OK", "{out}");
    assert!(lines[5].starts_with("NO") && lines[5].contains("[OVERQUOTA]"), "{out}");
    // MOVE does not change the account's usage.
    assert_eq!(lines[6], "OK", "{out}");
    assert!(lines[7].contains("(STORAGE 16 20)"), "{out}");
    assert_eq!(lines[8], "NO", "{out}");
    // No quota: no quota root.
    assert_eq!(lines[9], r#"('OK', [[b'"INBOX"'], [None]])"#, "{out}");
    assert!(lines[10].starts_with("NO") && lines[10].contains("NONEXISTENT"), "{out}");
}

#[test]
fn smtp_delivery_over_quota_is_deferred() {
    let node = node();
    let big = format!("Subject: big\r\n\r\n{}", format!("{}\r\n", "y".repeat(98)).repeat(150));
    // Room left: the message is taken whole, though it ends over the limit.
    let mut d = smtp(&node);
    d.cmd("MAIL FROM:<x@example.net>", 250);
    d.cmd("RCPT TO:<carol@example.test>", 250);
    d.cmd("DATA", 354);
    d.send_raw(big.as_bytes());
    d.send_raw(b".\r\n");
    assert_eq!(d.reply().0, 250);
    // A declared size that does not fit is refused at RCPT, temporarily.
    d.cmd("MAIL FROM:<x@example.net> SIZE=10000", 250);
    let r = d.cmd("RCPT TO:<carol@example.test>", 452);
    assert!(r.contains("4.2.2"), "{r}");
    // Other recipients of the same transaction are unaffected.
    d.cmd("RCPT TO:<alice@example.test>", 250);
    d.cmd("RSET", 250);
    let mut d = smtp(&node);
    d.cmd("MAIL FROM:<x@example.net>", 250);
    d.cmd("RCPT TO:<alice@example.test>", 250);
    d.cmd("DATA", 354);
    d.send_raw(big.as_bytes());
    d.send_raw(b".\r\n");
    assert_eq!(d.reply().0, 250);
    // Over the limit now (15 KB of 20 KiB, then 15 KB more): even an undeclared size waits.
    let mut d = smtp(&node);
    d.cmd("MAIL FROM:<x@example.net>", 250);
    d.cmd("RCPT TO:<carol@example.test>", 250);
    d.cmd("DATA", 354);
    d.send_raw(big.as_bytes());
    d.send_raw(b".\r\n");
    assert_eq!(d.reply().0, 250);
    d.cmd("MAIL FROM:<x@example.net>", 250);
    let r = d.cmd("RCPT TO:<carol@example.test>", 452);
    assert!(r.contains("4.2.2 Mailbox full"), "{r}");
    assert!(node.log().contains("reason=over-quota user=carol@example.test"), "{}", node.log());
    assert_eq!(inbox(&node, "carol@example.test").len(), 2);
}
