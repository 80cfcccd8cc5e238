//! SMTP inbound on the real binary: delivery with swaks and a Rust client, read back over IMAP;
//! relay attempts; limits and bad input, each with its reply and nothing stored half-way.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn setup_with_aliases() -> Setup {
    Setup {
        extra: r#"
[aliases]
"postmaster@example.test" = "alice@example.test"
"noc@example.test" = ["alice@example.test", "bob@example.test"]
"noreply@example.test" = "/dev/null"
"@example.net" = "@example.test"

[smtp]
max_message_size = "64KB"
max_recipients = 5
max_connections_per_ip = 8
"#
        .into(),
        ..Setup::default()
    }
}

#[test]
fn delivers_and_reads_back_the_same_bytes() {
    let node = Node::start(Setup::default());
    let msg = message("plain-1", "alice@example.test");
    let (code, text) = send_message(&node, "sender@peer.test", &["alice@example.test"], &msg);
    assert_eq!(code, 250, "{text}");
    let got = inbox(&node, "alice@example.test");
    assert_eq!(got.len(), 1);
    assert_eq!(strip_trace(&got[0]), unstuffed(&msg).into_bytes());
    let stored = String::from_utf8_lossy(&got[0]);
    // 127.0.0.1's reverse name, forward-confirmed (RFC 6761 names are answered by the resolver itself).
    assert!(stored.starts_with("Return-Path: <sender@peer.test>\r\nReceived: from client.test (localhost [127.0.0.1])"));
    assert!(stored.contains("by mx.example.test (Postern) with ESMTP id "));
    assert!(stored.contains("for <alice@example.test>;"));
    let log = node.log();
    assert!(log.contains("smtp connected address=127.0.0.1 host=localhost"), "{log}");
    assert!(log.contains("delivery id=") && log.contains("to=<alice@example.test>") && log.contains("result=Ok"));
}

#[test]
fn rust_client_with_starttls_and_received_records_tls() {
    let node = Node::start(Setup::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let msg = message("rust-1", "bob@example.test");
    rt.block_on(async {
        let mut client = mail_send::SmtpClientBuilder::new("127.0.0.1", node.smtp.port())
            .implicit_tls(false)
            .allow_invalid_certs()
            .helo_host("rust.client.test")
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .expect("connect with STARTTLS");
        // mail-send dot-stuffs what it is given and ends it with CRLF itself.
        let raw = msg.trim_end_matches("\r\n");
        let m = mail_send::smtp::message::Message::new("sender@peer.test", ["bob@example.test"], raw.as_bytes());
        client.send(m).await.expect("send");
        client.quit().await.unwrap();
    });
    let got = inbox(&node, "bob@example.test");
    assert_eq!(got.len(), 1);
    assert_eq!(strip_trace(&got[0]), msg.as_bytes());
    let stored = String::from_utf8_lossy(&got[0]);
    assert!(stored.contains("with ESMTPS id"), "{stored}");
    assert!(stored.contains("(version=TLSv1.3 cipher=TLS13_"), "{stored}");
    assert!(node.log().contains("smtp tls ciphers=TLS13_"));
}

#[test]
fn swaks_delivers_with_starttls_pipelining_and_chunking() {
    let node = Node::start(setup_with_aliases());
    let server = format!("127.0.0.1:{}", node.smtp.port());
    for extra in [&["--tls", "--pipeline"][..], &["--tls"][..], &[][..]] {
        let out = Command::new("swaks")
            .args(["--server", &server, "--from", "sender@peer.test", "--to", "postmaster@example.test"])
            .args(["--helo", "swaks.test", "--timeout", "20"])
            .args(extra)
            .output()
            .expect("swaks is installed by the test command");
        assert!(out.status.success(), "swaks {extra:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
    // BDAT (CHUNKING, RFC 3030) in several chunks, raw.
    let mut d = smtp(&node);
    d.cmd("MAIL FROM:<sender@peer.test>", 250);
    d.cmd("RCPT TO:<alice+lists@example.test>", 250);
    let body = message("bdat-1", "alice@example.test");
    let (a, b) = body.split_at(40);
    d.send(&format!("BDAT {}", a.len()));
    d.send_raw(a.as_bytes());
    assert_eq!(d.reply().0, 250);
    d.send(&format!("BDAT {} LAST", b.len()));
    d.send_raw(b.as_bytes());
    assert_eq!(d.reply().0, 250);
    let got = inbox(&node, "alice@example.test");
    assert_eq!(got.len(), 4);
    assert_eq!(strip_trace(&got[3]), body.as_bytes(), "BDAT content is stored as sent (no dot handling)");
}

#[test]
fn one_body_for_several_recipients_and_aliases() {
    let mut node = Node::start(setup_with_aliases());
    let msg = message("multi-1", "noc@example.test");
    let rcpts = ["noc@example.test", "alice@example.test", "bob+x@example.net", "noreply@example.test"];
    let (code, _) = send_message(&node, "sender@peer.test", &rcpts, &msg);
    assert_eq!(code, 250);
    // alice: via noc and directly, once; bob: via noc and the domain alias with +tag, once.
    assert_eq!(inbox(&node, "alice@example.test").len(), 1);
    assert_eq!(inbox(&node, "bob@example.test").len(), 1);
    assert!(node.log().contains("rcpt=/dev/null"));
    node.stop();
    let store = open_store(&node.data_dir());
    let (bodies, chunks) = store.blob_counts().unwrap();
    assert_eq!((bodies, chunks), (1, 1), "the body is stored once for both mailboxes");
    // No "for <...>" clause with several recipients: they do not see each other.
    let acct = store.account_id("alice@example.test").unwrap().unwrap();
    let inbox = store.mailbox_id(acct, "INBOX").unwrap().unwrap();
    let (_, e) = &store.entries(acct, inbox).unwrap()[0];
    let raw = store.read_blob_bytes(&e.blob).unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("\tfor <"));
}

#[test]
fn nobody_can_relay_through_port_25() {
    let node = Node::start(setup_with_aliases());
    let mut d = smtp(&node);
    d.cmd("MAIL FROM:<sender@peer.test>", 250);
    for (rcpt, code, status) in [
        ("<victim@elsewhere.example>", 550, "5.7.1"),
        ("<victim@example.test.elsewhere.example>", 550, "5.7.1"),
        ("<victim%elsewhere.example@example.test>", 550, "5.1.1"),
        ("<@example.test:victim@elsewhere.example>", 550, "5.7.1"),
        ("<@a.example,@example.test:victim@elsewhere.example>", 550, "5.7.1"),
        ("<\"victim@elsewhere.example\"@example.test>", 550, "5.1.1"),
        ("<victim@elsewhere.example@example.test>", 501, "5.1.3"),
        ("<elsewhere.example!victim@example.test>", 550, "5.1.1"),
        ("<victim@[192.0.2.1]>", 550, "5.7.1"),
        ("<nobody@example.test>", 550, "5.1.1"),
        ("victim@elsewhere.example", 501, "5.1.3"),
    ] {
        let text = d.cmd(&format!("RCPT TO:{rcpt}"), code);
        assert!(text.contains(status), "{rcpt}: {text}");
    }
    // Nothing was accepted: DATA has no recipient.
    d.cmd("DATA", 554);
    assert!(node.log().contains("reason=relay-denied"));
}

#[test]
fn commands_out_of_order_and_syntax_errors() {
    let node = Node::start(setup_with_aliases());
    let mut d = Dialog::connect(node.smtp);
    assert_eq!(d.reply().0, 220);
    d.cmd("MAIL FROM:<a@peer.test>", 503);
    d.cmd("EHLO", 501);
    let ehlo = d.cmd("EHLO client.test", 250);
    for ext in ["PIPELINING", "SIZE 64000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "STARTTLS"] {
        assert!(ehlo.contains(ext), "{ext} in {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "no AUTH on port 25");
    d.cmd("RCPT TO:<alice@example.test>", 503);
    d.cmd("DATA", 503);
    d.cmd("XYZZY", 500);
    d.cmd("AUTH PLAIN", 502);
    d.cmd("VRFY alice", 252);
    d.cmd("EXPN noc", 502);
    d.cmd("HELP", 214);
    d.cmd("NOOP", 250);
    d.cmd("MAIL FROM:<a@peer.test> RET=HDRS", 555);
    d.cmd("MAIL FROM:<a@peer.test> SIZE=99999999", 552);
    d.cmd("MAIL FROM:<a@peer.test>", 250);
    d.cmd("MAIL FROM:<a@peer.test>", 503);
    for i in 0..5 {
        d.cmd(&format!("RCPT TO:<alice+{i}@example.test>"), 250);
    }
    let text = d.cmd("RCPT TO:<bob@example.test>", 452);
    assert!(text.contains("4.5.3"));
    d.cmd("RSET", 250);
    // A command line over 1000 octets (RFC 5321 §4.5.3.1.4) is refused and the session goes on.
    d.send(&format!("NOOP {}", "x".repeat(3000)));
    assert_eq!(d.reply().0, 500);
    d.cmd("NOOP", 250);
    d.cmd("QUIT", 221);
}

#[test]
fn bad_bodies_are_refused_and_nothing_is_stored() {
    let mut node = Node::start(setup_with_aliases());
    let mut d = smtp(&node);
    let mut attempt = |body: &[u8], code: u16| {
        d.cmd("MAIL FROM:<sender@peer.test>", 250);
        d.cmd("RCPT TO:<alice@example.test>", 250);
        d.cmd("DATA", 354);
        d.send_raw(body);
        let (c, text) = d.reply();
        assert_eq!(c, code, "{}: {text}", String::from_utf8_lossy(&body[..body.len().min(60)]));
    };
    // SMTP smuggling: a bare-LF "end of data" followed by a second transaction must not split it.
    attempt(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@peer.test>\r\nRCPT TO:<bob@example.test>\r\n.\r\n", 550);
    attempt(b"Subject: x\r\n\r\nbare\rcr\r\n.\r\n", 550);
    let long = format!("Subject: x\r\n\r\n{}\r\n.\r\n", "y".repeat(1200));
    attempt(long.as_bytes(), 500);
    // Over max_message_size (64 KB): read to the end without storing, then 552.
    let big = format!(
        "Subject: big\r\n\r\n{}.\r\n",
        "z".repeat(900).repeat(100).replace(&"z".repeat(900), &format!("{}\r\n", "z".repeat(900)))
    );
    attempt(big.as_bytes(), 552);
    // The session still works.
    attempt(
        message("after-errors", "alice@example.test")
            .as_bytes()
            .iter()
            .chain(b".\r\n")
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
        250,
    );
    assert_eq!(inbox(&node, "alice@example.test").len(), 1);
    assert_eq!(inbox(&node, "bob@example.test").len(), 0, "the smuggled transaction did not happen");
    node.stop();
    let store = open_store(&node.data_dir());
    assert_eq!(store.blob_counts().unwrap(), (1, 1), "refused bodies left no chunks behind");
}

#[test]
fn a_client_that_stops_mid_data_leaves_nothing_and_others_are_served() {
    let mut node = Node::start(setup_with_aliases());
    {
        let mut d = smtp(&node);
        d.cmd("MAIL FROM:<sender@peer.test>", 250);
        d.cmd("RCPT TO:<alice@example.test>", 250);
        d.cmd("DATA", 354);
        d.send_raw(format!("Subject: cut\r\n\r\n{}", "half a message\r\n".repeat(10_000)).as_bytes());
        // Dropped here without the final dot.
    }
    let (code, _) = send_message(&node, "sender@peer.test", &["bob@example.test"], &message("ok-1", "bob"));
    assert_eq!(code, 250);
    assert_eq!(inbox(&node, "alice@example.test").len(), 0);
    node.stop();
    let store = open_store(&node.data_dir());
    assert_eq!(store.blob_counts().unwrap(), (1, 1), "only bob's message is stored");
}

#[test]
fn tls_garbage_and_per_ip_connection_cap() {
    let node = Node::start(setup_with_aliases());
    let mut d = smtp(&node);
    d.cmd("STARTTLS", 220);
    d.send_raw(b"this is not a TLS client hello\r\n\r\n");
    assert!(d.closed(), "the server hangs up after a failed handshake");
    // Hold every slot (reading each greeting, so the server has counted each one), then one more.
    let mut held = Vec::new();
    wait_for("eight sessions", Duration::from_secs(10), || {
        let mut d = Dialog::connect(node.smtp);
        if d.reply().0 == 220 {
            held.push(d);
        }
        held.len() == 8
    });
    let mut extra = Dialog::connect(node.smtp);
    let (code, text) = extra.reply();
    assert_eq!(code, 421, "{text}");
    drop(held);
    wait_for("a slot to free up", Duration::from_secs(10), || {
        let mut d = Dialog::connect(node.smtp);
        d.reply().0 == 220
    });
    let (code, _) = send_message(&node, "sender@peer.test", &["alice@example.test"], &message("cap-1", "alice"));
    assert_eq!(code, 250);
    assert!(node.log().contains("reason=too-many-connections"));
}

#[test]
fn pipelined_transaction_gets_all_replies() {
    let node = Node::start(setup_with_aliases());
    let mut d = smtp(&node);
    // RFC 2920: the whole envelope in one write.
    d.send_raw(b"MAIL FROM:<sender@peer.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n");
    let codes: Vec<u16> = (0..5).map(|_| d.reply().0).collect();
    assert_eq!(codes, vec![250, 250, 550, 250, 354]);
    d.send_raw(message("pipe-1", "x").as_bytes());
    d.send_raw(b".\r\nQUIT\r\n");
    assert_eq!(d.reply().0, 250);
    assert_eq!(d.reply().0, 221);
    assert_eq!(inbox(&node, "bob@example.test").len(), 1);
}

/// CVE-2011-0411: a command sent in the clear right behind STARTTLS must not run inside TLS.
#[test]
fn plaintext_pipelined_after_starttls_is_discarded() {
    let node = Node::start(Setup::default());
    let script = format!(
        r#"
import socket, ssl
s = socket.create_connection(('127.0.0.1', {port}))
f = s.makefile('rb')
def reply():
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l)
        if len(l) < 4 or l[3] != '-':
            return ''.join(lines)
assert reply().startswith('220')
s.sendall(b'EHLO x.test\r\n'); reply()
s.sendall(b'STARTTLS\r\nRSET\r\nMAIL FROM:<injected@peer.test>\r\n')
assert reply().startswith('220 2.0.0')
c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
t = c.wrap_socket(s, server_hostname='localhost')
tf = t.makefile('rb')
t.sendall(b'EHLO y.test\r\n')
first = tf.readline().decode()
assert first.startswith('250-mx.example.test Hello y.test'), first
while not tf.readline().decode().startswith('250 '): pass
t.sendall(b'RCPT TO:<alice@example.test>\r\n')
r = tf.readline().decode()
assert r.startswith('503'), 'no MAIL ran inside TLS: ' + r
print('ok')
"#,
        port = node.smtp.port()
    );
    let out = Command::new("python3").arg("-c").arg(script).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));
}

/// RFC 5321 §4.5.3.2: an idle client is dropped with a 421 after the command timeout.
#[test]
fn idle_client_times_out_with_421() {
    let node = Node::start(Setup { extra: "[smtp]\ncommand_timeout = \"1s\"\n".into(), ..Setup::default() });
    let mut d = smtp(&node);
    std::thread::sleep(Duration::from_millis(1500));
    let (code, text) = d.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.4.2"));
    assert!(d.closed());
    assert!(node.log().contains("reason=timeout"));
}
