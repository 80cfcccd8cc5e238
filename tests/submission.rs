//! Message submission (RFC 6409) on 587 with STARTTLS and 465 with implicit TLS (RFC 8314):
//! swaks and Python smtplib as clients; AUTH, TLS and sender policy refusals; header completion;
//! per-user limits; Sent copies; foreign recipients queued.

mod common;

use std::process::Command;

use common::*;

const LISTEN: &str = "listen.submission = [\"127.0.0.1:0\"]\nlisten.submissions = [\"127.0.0.1:0\"]\n";

/// A user with their own settings (the harness writes the plain users).
fn user_table(address: &str, extra: &str) -> String {
    format!("[users.\"{address}\"]\npassword = \"{}\"\n{extra}\n", postern::auth::hash_password(PASSWORD))
}

fn setup(extra: &str) -> Setup {
    Setup {
        node_extra: LISTEN.into(),
        extra: format!(
            "[aliases]\n\"postmaster@example.test\" = \"alice@example.test\"\n\"@example.net\" = \"@example.test\"\n\n\
             [outbound]\nrelay = \"smtp://127.0.0.1:9\"\n\n{extra}"
        ),
        ..Setup::default()
    }
}

/// Runs Python with smtplib helpers: `sub(user)` (587, STARTTLS, login when `user`),
/// `subs(user)` (465), `msg(frm, to, extra_headers)`. Returns stdout; panics on failure.
fn python(node: &Node, script: &str) -> String {
    let prelude = format!(
        "import smtplib, base64\nSUB={}\nSUBS={}\n\
         def sub(user=None, password=PASSWORD):\n    s = smtplib.SMTP(HOST, SUB, timeout=20)\n    s.ehlo('py.test')\n\
         \x20   s.starttls(context=tls())\n    s.ehlo('py.test')\n    if user:\n        s.login(user, password)\n    return s\n\
         def subs(user=None):\n    s = smtplib.SMTP_SSL(HOST, SUBS, timeout=20, context=tls())\n    s.ehlo('py.test')\n\
         \x20   if user:\n        s.login(user, PASSWORD)\n    return s\n\
         def msg(frm, to, extra='Message-ID: <fixed-1@client.test>\\r\\nDate: Sat, 21 Nov 2026 10:00:00 +0000\\r\\n'):\n\
         \x20   return ('From: ' + frm + '\\r\\nTo: ' + to + '\\r\\nSubject: hello\\r\\n' + extra + '\\r\\nBody text.\\r\\n').encode()\n\
         def plain(user, pw):\n    return base64.b64encode(('\\0' + user + '\\0' + pw).encode()).decode()\n",
        node.addr("submission").port(),
        node.addr("submissions").port(),
    );
    python_imap(node, &format!("{prelude}{script}"))
}

fn swaks(node: &Node, args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(["--helo", "swaks.test", "--timeout", "20", "--auth-password", PASSWORD])
        .args(args)
        .output()
        .expect("swaks is installed by the test command");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "swaks {args:?}: {stdout}\nserver log:\n{}", node.log());
    stdout
}

#[test]
fn swaks_and_smtplib_submit_on_both_ports() {
    let node = Node::start(setup(""));
    let s587 = format!("127.0.0.1:{}", node.addr("submission").port());
    let s465 = format!("127.0.0.1:{}", node.addr("submissions").port());
    let common = ["--from", "alice@example.test", "--to", "bob@example.test", "--auth-user", "alice@example.test"];
    swaks(&node, &[&["--server", &s587, "--tls", "--auth", "PLAIN"][..], &common[..]].concat());
    swaks(&node, &[&["--server", &s465, "--tlsc", "--auth", "LOGIN"][..], &common[..]].concat());
    let out = python(
        &node,
        "s = sub('alice@example.test')\nprint(s.sendmail('alice@example.test', ['bob@example.test'], \
         msg('alice@example.test', 'bob@example.test')))\ns.quit()\n\
         s = subs('Alice@Example.test')\nprint(s.sendmail('alice@example.test', ['bob@example.test'], \
         msg('alice@example.test', 'bob@example.test')))\ns.quit()\n",
    );
    assert_eq!(out, "{}\n{}\n");
    let got = inbox(&node, "bob@example.test");
    assert_eq!(got.len(), 4);
    for m in &got {
        let m = String::from_utf8_lossy(m);
        assert!(m.starts_with("Return-Path: <alice@example.test>\r\n"), "{m}");
        assert!(m.contains(" with ESMTPSA id "), "{m}");
        assert!(m.contains("\r\nMessage-ID: ") || m.contains("\r\nMessage-Id: "), "{m}");
    }
    let log = node.log();
    assert!(log.contains("smtp auth user=alice@example.test result=ok"), "{log}");
    assert!(!log.contains(PASSWORD));
}

#[test]
fn refusals_before_tls_and_auth() {
    let node = Node::start(setup(""));
    let mut d = Dialog::connect(node.addr("submission"));
    assert_eq!(d.reply().0, 220);
    let ehlo = d.cmd("EHLO client.test", 250);
    assert!(ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    let r = d.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB4", 530);
    assert!(r.contains("5.7.0 Must issue a STARTTLS command first"), "{r}");
    let r = d.cmd("MAIL FROM:<alice@example.test>", 530);
    assert!(r.contains("5.7.0 Must issue a STARTTLS command first"), "{r}");
    // A relay attempt in the clear gets nowhere.
    d.cmd("RCPT TO:<victim@remote.example>", 530);
    d.cmd("QUIT", 221);
    // Port 25 is unchanged: no AUTH there.
    let mut d = smtp(&node);
    d.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB4", 502);
    d.cmd("QUIT", 221);

    let out = python(
        &node,
        "s = sub()\nprint('AUTH PLAIN LOGIN' in s.ehlo_resp.decode())\n\
         print(s.mail('alice@example.test'))\nprint(s.rcpt('victim@remote.example'))\n\
         print(s.docmd('AUTH', 'PLAIN ' + plain('alice@example.test', 'wrong')))\n\
         print(s.docmd('AUTH', 'PLAIN'))\nprint(s.docmd('*'))\n\
         print(s.docmd('AUTH', 'PLAIN !!!notbase64'))\n\
         print(s.docmd('AUTH', 'CRAM-MD5'))\n\
         print(s.docmd('AUTH', 'LOGIN'))\nprint(s.docmd(base64.b64encode(b'alice@example.test').decode()))\n\
         print(s.docmd(base64.b64encode(PASSWORD.encode()).decode()))\n\
         print(s.docmd('AUTH', 'PLAIN ' + plain('alice@example.test', PASSWORD)))\ns.quit()\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "True", "{out}");
    assert!(lines[1].starts_with("(530, b'5.7.0 Authentication required"), "{out}");
    assert!(lines[2].starts_with("(530,"), "{out}");
    assert!(lines[3].starts_with("(535, b'5.7.8 Authentication credentials invalid"), "{out}");
    assert!(lines[4].starts_with("(334,"), "{out}");
    assert!(lines[5].starts_with("(501, b'5.0.0"), "{out}");
    assert!(lines[6].starts_with("(501, b'5.5.2"), "{out}");
    assert!(lines[7].starts_with("(504,"), "{out}");
    assert_eq!(lines[8], "(334, b'VXNlcm5hbWU6')", "{out}");
    assert_eq!(lines[9], "(334, b'UGFzc3dvcmQ6')", "{out}");
    assert!(lines[10].starts_with("(235, b'2.7.0 Authentication successful"), "{out}");
    assert!(lines[11].starts_with("(503,"), "{out}");
    let log = node.log();
    assert!(log.contains("smtp auth user=alice@example.test address=127.0.0.1 result=failed"), "{log}");
    assert!(!log.contains("wrong"));
}

#[test]
fn repeated_failures_are_refused_with_454() {
    let node = Node::start(setup("[submission]\nauth_failures_per_user = 3\nauth_failures_per_ip = 5\n"));
    let out = python(
        &node,
        "s = sub()\nfor i in range(3):\n    print(s.docmd('AUTH', 'PLAIN ' + plain('alice@example.test', 'bad'))[0])\n\
         print(s.docmd('AUTH', 'PLAIN ' + plain('alice@example.test', PASSWORD)))\n\
         for i in range(2):\n    print(s.docmd('AUTH', 'PLAIN ' + plain('bob@example.test', 'bad'))[0])\n\
         print(s.docmd('AUTH', 'PLAIN ' + plain('bob@example.test', PASSWORD))[0])\ns.quit()\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["535", "535", "535"], "{out}");
    assert!(lines[3].contains("454, b'4.7.0 Too many failed authentication attempts, try again later"), "{out}");
    assert_eq!(&lines[4..], ["535", "535", "454"], "{out}");
    assert!(node.log().contains("result=blocked"));
}

#[test]
fn sender_policy() {
    let node = Node::start(setup(""));
    let out = python(
        &node,
        "s = sub('bob@example.test')\nprint(s.mail('alice@example.test')[0])\ns.rset()\n\
         print(s.mail('<>')[0])\ns.rset()\n\
         print(s.mail('bob@example.test')[0], s.rcpt('alice@example.test')[0])\n\
         print(s.data(msg('alice@example.test', 'alice@example.test')))\n\
         print(s.mail('bob+x@example.test')[0], s.rcpt('alice@example.test')[0])\n\
         print(s.data(msg('Bob <BOB@example.test>', 'alice@example.test'))[0])\ns.quit()\n\
         s = sub('alice@example.test')\n\
         print(s.sendmail('postmaster@example.test', ['bob@example.test'], msg('postmaster@example.test', 'bob')))\n\
         s.quit()\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "553", "{out}");
    assert_eq!(lines[1], "553", "{out}");
    assert_eq!(lines[2], "250 250", "{out}");
    assert!(lines[3].starts_with("(553, b'5.7.1 From header address not allowed for this user"), "{out}");
    assert_eq!(lines[4], "250 250", "{out}");
    assert_eq!(lines[5], "250", "{out}");
    assert_eq!(lines[6], "{}", "{out}");
    // The refused message was not stored.
    assert_eq!(inbox(&node, "alice@example.test").len(), 1);
    assert_eq!(inbox(&node, "bob@example.test").len(), 1);
    let r = python(&node, "s = sub('alice@example.test')\nprint(s.mail('bob@example.test'))\ns.quit()\n");
    assert!(r.starts_with("(553, b'5.7.1 Sender address not allowed for this user"), "{r}");
}

#[test]
fn send_as_entries() {
    let carol = user_table("carol@example.test", "send_as = [\"@example.org\", \"shared@example.net\"]");
    let node = Node::start(setup(&carol));
    let out = python(
        &node,
        "s = sub('carol@example.test')\n\
         print(s.sendmail('anyone@example.org', ['bob@example.test'], msg('anyone@example.org', 'bob')))\n\
         print(s.sendmail('shared@example.net', ['bob@example.test'], msg('Shared <shared@example.net>', 'bob')))\n\
         print(s.mail('x@other.example.org')[0])\ns.quit()\n",
    );
    assert_eq!(out, "{}\n{}\n553\n");
}

#[test]
fn message_id_and_date_added_when_missing() {
    let node = Node::start(setup(""));
    python(
        &node,
        "s = sub('alice@example.test')\n\
         s.sendmail('alice@example.test', ['bob@example.test'], msg('alice@example.test', 'bob', extra=''))\n\
         s.sendmail('alice@example.test', ['bob@example.test'], msg('alice@example.test', 'bob'))\ns.quit()\n",
    );
    let got = inbox(&node, "bob@example.test");
    assert_eq!(got.len(), 2);
    let first = String::from_utf8_lossy(&got[0]).to_string();
    let (head, body) = first.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("\r\nDate: ") && head.contains("\r\nMessage-ID: <") && head.contains("@mx.example.test>"));
    assert_eq!(body, "Body text.\r\n");
    let second = String::from_utf8_lossy(&got[1]).to_string();
    assert_eq!(second.matches("Message-ID:").count(), 1, "{second}");
    assert!(second.contains("Message-ID: <fixed-1@client.test>"));
    assert_eq!(second.matches("\r\nDate:").count(), 1, "{second}");
    assert!(second.contains("Date: Sat, 21 Nov 2026 10:00:00 +0000"));
}

#[test]
fn save_sent_files_a_seen_copy() {
    let carol = user_table("carol@example.test", "save_sent = true");
    let node = Node::start(setup(&carol));
    python(
        &node,
        "s = sub('carol@example.test')\n\
         s.sendmail('carol@example.test', ['bob@example.test'], msg('carol@example.test', 'bob'))\n\
         s = sub('alice@example.test')\n\
         s.sendmail('alice@example.test', ['bob@example.test'], msg('alice@example.test', 'bob'))\n",
    );
    assert_eq!(inbox(&node, "bob@example.test").len(), 2);
    let out = python(
        &node,
        "m = login('carol@example.test')\nm.select('Sent', readonly=True)\n\
         print(m.fetch('1:*', '(FLAGS)')[1])\n\
         m = login('alice@example.test')\nprint(m.select('Sent', readonly=True)[1])\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("[b'1 (FLAGS (") && lines[0].contains("\\\\Seen"), "{out}");
    assert!(!lines[0].contains("b'2 "), "{out}");
    assert_eq!(lines[1], "[b'0']", "{out}");
}

#[test]
fn recipient_and_hourly_limits() {
    let carol = user_table("carol@example.test", "max_recipients = 2\nmax_messages_per_hour = 2");
    let node = Node::start(setup(&carol));
    let out = python(
        &node,
        "s = sub('carol@example.test')\nprint(s.mail('carol@example.test')[0])\n\
         print(s.rcpt('alice@example.test')[0], s.rcpt('bob@example.test')[0])\nprint(s.rcpt('x@remote.example'))\n\
         print(s.data(msg('carol@example.test', 'x'))[0])\n\
         print(s.sendmail('carol@example.test', ['bob@example.test'], msg('carol@example.test', 'bob')))\n\
         print(s.mail('carol@example.test'))\ns.quit()\n\
         s = sub('alice@example.test')\nprint(s.mail('alice@example.test')[0])\ns.quit()\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "250", "{out}");
    assert_eq!(lines[1], "250 250", "{out}");
    assert!(lines[2].starts_with("(452, b'4.5.3 Too many recipients"), "{out}");
    assert_eq!(lines[3], "250", "{out}");
    assert_eq!(lines[4], "{}", "{out}");
    assert!(lines[5].starts_with("(451, b'4.7.1 Sending rate limit exceeded, try again later"), "{out}");
    assert_eq!(lines[6], "250", "{out}");
}

#[test]
fn foreign_recipient_is_queued_and_unknown_local_refused() {
    let mut node = Node::start(setup(""));
    let out = python(
        &node,
        "s = subs('alice@example.test')\nprint(s.mail('alice@example.test')[0])\n\
         print(s.rcpt('nobody@example.test')[0])\nprint(s.rcpt('Friend@Remote.Example')[0])\n\
         print(s.rcpt('bob@example.test')[0])\nprint(s.data(msg('alice@example.test', 'friend@remote.example'))[0])\n\
         s.quit()\n",
    );
    assert_eq!(out, "250\n550\n250\n250\n250\n");
    assert_eq!(inbox(&node, "bob@example.test").len(), 1);
    node.stop();
    let store = open_store(&node.data_dir());
    let queued = store.queue_list(None, 10).unwrap();
    assert_eq!(queued.len(), 1, "{queued:?}");
    let addrs: Vec<&str> = queued[0].recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addrs, ["friend@remote.example"]);
    assert_eq!(queued[0].origin, "submission alice@example.test");
    assert_eq!(queued[0].from, "alice@example.test");
}

#[test]
fn bdat_chunks_get_headers_completed_and_from_checked() {
    let node = Node::start(setup(""));
    let out = python(
        &node,
        "s = sub('alice@example.test')\n\
         def bdat(chunks):\n    for i, c in enumerate(chunks):\n        last = ' LAST' if i == len(chunks) - 1 else ''\n\
         \x20       s.send(('BDAT %d%s\\r\\n' % (len(c), last)).encode() + c)\n        code = s.getreply()[0]\n    return code\n\
         print(s.mail('alice@example.test')[0], s.rcpt('bob@example.test')[0])\n\
         print(bdat([b'From: alice@example.test\\r\\nSubj', b'ect: chunked\\r\\n\\r', b'\\nbody\\r\\n']))\n\
         print(s.mail('alice@example.test')[0], s.rcpt('bob@example.test')[0])\n\
         print(bdat([b'From: bob@example.test\\r\\n', b'\\r\\nbody\\r\\n']))\ns.quit()\n",
    );
    assert_eq!(out, "250 250\n250\n250 250\n553\n");
    let got = inbox(&node, "bob@example.test");
    assert_eq!(got.len(), 1);
    let m = String::from_utf8_lossy(&got[0]).to_string();
    let (head, body) = m.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("\r\nSubject: chunked\r\nDate: ") && head.contains("\r\nMessage-ID: <"), "{m}");
    assert_eq!(body, "body\r\n");
}
