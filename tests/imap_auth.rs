//! IMAP logins with Python's imaplib: AUTHENTICATE PLAIN and LOGIN (with and without SASL-IR),
//! and failed logins limited per user and per client address across connections, in one count
//! shared with SMTP submission.

mod common;

use common::*;

#[test]
fn authenticate_plain_and_login() {
    let node = Node::start(Setup::default());
    let out = python_imap(
        &node,
        r#"
import base64
def fresh():
    return imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls())
# LOGIN mechanism: imaplib answers each challenge with the callback's value.
m = fresh()
answers = iter([b'alice@example.test', PASSWORD.encode()])
prompts = []
def login_cb(challenge):
    prompts.append(challenge)
    return next(answers)
print(m.authenticate('LOGIN', login_cb)[0], prompts)
print(m.select('INBOX')[0])
# PLAIN without an initial response (imaplib sends none unless asked).
m = fresh()
print(m.authenticate('PLAIN', lambda c: b'\0bob@example.test\0' + PASSWORD.encode())[0])
# PLAIN and LOGIN with SASL-IR, written by hand.
for line in [b'a AUTHENTICATE PLAIN ' + base64.b64encode(b'\0alice@example.test\0' + PASSWORD.encode()),
             b'a AUTHENTICATE LOGIN ' + base64.b64encode(b'alice@example.test')]:
    m = fresh()
    m.send(line + b'\r\n')
    reply = m.readline()
    if reply.startswith(b'+'):
        print(reply.strip().decode())
        m.send(base64.b64encode(PASSWORD.encode()) + b'\r\n')
        reply = m.readline()
    print(reply.split(b' [')[0].decode())
# A cancelled exchange.
m = fresh()
m.send(b'c AUTHENTICATE LOGIN\r\n')
m.readline()
m.send(b'*\r\n')
print(m.readline().strip().decode())
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "OK [b'Username:', b'Password:']", "{out}");
    assert_eq!(lines[1], "OK", "{out}");
    assert_eq!(lines[2], "OK", "{out}");
    assert_eq!(lines[3], "a OK", "{out}");
    assert_eq!(lines[4], "+ UGFzc3dvcmQ6", "{out}");
    assert_eq!(lines[5], "a OK", "{out}");
    assert_eq!(lines[6], "c BAD Authentication cancelled", "{out}");
}

#[test]
fn failed_logins_are_limited_per_user_across_connections_and_protocols() {
    let node = Node::start(Setup {
        extra: "[submission]\nauth_failures_per_user = 3\nauth_failures_per_ip = 50\n".into(),
        node_extra: "listen.submission = [\"127.0.0.1:0\"]\n".into(),
        ..Setup::default()
    });
    let out = python_imap(
        &node,
        &format!(
            r#"
import smtplib
def attempt(password):
    m = imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls())
    try:
        m.login('alice@example.test', password)
        return 'OK'
    except imaplib.IMAP4.error as e:
        return str(e)
print(attempt('wrong-1'))
print(attempt('wrong-2'))
print(attempt('wrong-3'))
# The limit is reached: even the right password is refused, without being checked.
print(attempt(PASSWORD))
# Another user from the same address is still served.
m = imaplib.IMAP4_SSL(HOST, PORT, ssl_context=tls())
print(m.login('bob@example.test', PASSWORD)[0])
# Submission shares the count.
s = smtplib.SMTP(HOST, {submission}, timeout=20)
s.starttls(context=tls())
try:
    s.login('alice@example.test', PASSWORD)
    print('smtp OK')
except smtplib.SMTPAuthenticationError as e:
    print('smtp', e.smtp_code)
"#,
            submission = node.addr("submission").port()
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    for l in &lines[..3] {
        assert!(l.contains("[AUTHENTICATIONFAILED]"), "{out}");
    }
    assert!(lines[3].contains("[UNAVAILABLE]"), "{out}");
    assert_eq!(lines[4], "OK", "{out}");
    assert_eq!(lines[5], "smtp 454", "{out}");
    let log = node.log();
    assert!(log.contains("imap login blocked user=alice@example.test address=127.0.0.1"), "{log}");
    assert_eq!(log.matches("imap login failed user=alice@example.test").count(), 3, "{log}");
    assert!(!log.contains(PASSWORD), "no password in the log");
}

#[test]
fn plaintext_login_only_on_loopback_and_only_when_configured() {
    let node = Node::start(Setup { extra: "[imap]\nplaintext_on_loopback = true\n".into(), ..Setup::default() });
    let out = python_imap(
        &node,
        r#"
m = imaplib.IMAP4(HOST, PORT143)
print('LOGINDISABLED' in m.capabilities, 'AUTH=PLAIN' in m.capabilities)
print(m.login('alice@example.test', PASSWORD)[0])
"#,
    );
    assert_eq!(out, "False True\nOK\n");
    // The default: refused before TLS (login.dialogue has the exchange).
    let node = Node::start(Setup::default());
    let out = python_imap(
        &node,
        r#"
m = imaplib.IMAP4(HOST, PORT143)
print('LOGINDISABLED' in m.capabilities)
try:
    m.login('alice@example.test', PASSWORD)
except imaplib.IMAP4.error as e:
    print('PRIVACYREQUIRED' in str(e))
"#,
    );
    assert_eq!(out, "True\nTrue\n");
}
