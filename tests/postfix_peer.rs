//! Interoperability with a real Postfix MTA as the peer: Postern's outbound queue delivers to a
//! Postfix receiving MX (found by MX lookup in the in-process test DNS, over STARTTLS), Postfix
//! relays into Postern's port 25, and Postern bounces what Postfix rejects.

mod common;
#[path = "common/opendkim.rs"]
mod opendkim;
#[path = "common/postfix.rs"]
mod postfix;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::dns::TestDns;
use common::*;
use postfix::Postfix;

const ZONE: &str = "dest.example MX 10 mx.dest.example\nmx.dest.example A 127.0.0.1\n";

/// A Postern node for example.test whose `fwd@example.test` forwards to carol@dest.example,
/// with its MX deliveries going to `mx_port`.
fn postern(dns: &TestDns, mx_port: u16) -> Node {
    Node::start(Setup {
        domains: vec!["example.test".into()],
        users: vec!["alice@example.test".into()],
        hostname: "mx.example.test".into(),
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\n\
             [outbound]\nmx_port = {mx_port}\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [aliases]\n\"fwd@example.test\" = \"carol@dest.example\"\n",
            dns.addr()
        ),
        ..Setup::default()
    })
}

/// The header block of a message, with LF or CRLF line ends, unfolded into one string per field.
fn headers(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg).replace("\r\n", "\n");
    let head = text.split("\n\n").next().unwrap_or("").to_string();
    let mut fields: Vec<String> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push('\n');
                last.push_str(line);
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields
}

fn fields<'a>(all: &'a [String], name: &str) -> Vec<&'a String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    all.iter().filter(|f| f.to_ascii_lowercase().starts_with(&prefix)).collect()
}

/// Sends the test message `id` from `from` to fwd@example.test on port 25, asserting it was
/// accepted; returns the message.
fn send_to_fwd(node: &Node, id: &str, from: &str) -> String {
    let msg = message(id, "fwd@example.test");
    let (code, text) = send_message(node, from, &["fwd@example.test"], &msg);
    assert_eq!(code, 250, "{text}");
    msg
}

/// Postern's log lines about the outbound queue.
fn queue_lines(node: &Node) -> Vec<String> {
    node.log().lines().filter(|l| l.contains("queue id=")).map(str::to_string).collect()
}

#[test]
fn postern_delivers_to_postfix_mx() {
    let dns = TestDns::start(ZONE);
    let mx = Postfix::mx(&["carol"]);
    let node = postern(&dns, mx.addr.port());

    let msg = send_to_fwd(&node, "to-postfix", "sender@peer.test");

    let delivered = mx.wait_for_maildir("carol", 1, Duration::from_secs(30));
    assert_eq!(delivered.len(), 1);
    let got = String::from_utf8_lossy(&delivered[0]).into_owned();
    let context = format!("delivered:\n{got}\npostfix maillog:\n{}\npostern log:\n{}", mx.maillog(), node.log());

    // The message as the client sent it (dot-stuffing removed, LF line ends in the Maildir)
    // follows the trace headers byte for byte.
    let want = unstuffed(&msg).replace("\r\n", "\n");
    let start = got.find("\nFrom: Sender").map(|i| i + 1).expect(&context);
    assert_eq!(&got[start..], want, "{context}");

    let all = headers(&delivered[0]);
    assert_eq!(fields(&all, "Subject"), ["Subject: test to-postfix"], "{context}");
    assert_eq!(fields(&all, "Message-ID"), ["Message-ID: <to-postfix@peer.test>"], "{context}");
    // One Return-Path, Postfix's own at the top; Postern must not have sent its local one on.
    let rp = fields(&all, "Return-Path");
    assert_eq!(rp.len(), 1, "{context}");
    assert!(all[0].starts_with("Return-Path: <"), "{context}");
    assert!(!rp[0].contains("<>"), "{context}");

    let received = fields(&all, "Received");
    let ours = received.iter().find(|r| r.contains("(Postern)")).expect(&context);
    assert!(ours.contains("by mx.example.test (Postern)"), "{ours}");
    assert!(ours.contains("from client.test"), "{ours}");
    let theirs = received.iter().find(|r| r.contains("(Postfix)")).expect(&context);
    assert!(theirs.contains("by postfix.peer.test (Postfix) with ESMTPS"), "{theirs}");
    // Postern greeted with its own hostname.
    assert!(theirs.starts_with("Received: from mx.example.test ("), "{theirs}");
    assert!(theirs.contains("using TLSv1."), "Postfix saw no TLS: {theirs}");
    // Postfix's header comes first: it was added last.
    let pos = |needle: &str| got.find(needle).unwrap();
    assert!(pos("(Postfix)") < pos("(Postern)"), "{context}");
    assert!(mx.maillog().contains("Anonymous TLS connection established from localhost[127.0.0.1]"), "{context}");
    assert!(mx.maillog().contains("status=sent (delivered to maildir)"), "{context}");

    // Postern logged the delivery with the TLS it used.
    wait_for("the queue's result line", Duration::from_secs(10), || {
        queue_lines(&node).iter().any(|l| l.contains("result=Ok"))
    });
    let lines = queue_lines(&node);
    let ok = lines.iter().find(|l| l.contains("result=Ok")).unwrap();
    assert!(ok.contains("to=<carol@dest.example>"), "{ok}");
    assert!(ok.contains("relay=mx.dest.example[127.0.0.1]"), "{ok}");
    assert!(ok.contains("tls=\"TLS") && ok.contains("unverified"), "{ok}");
    assert!(ok.contains("reply=\"250"), "{ok}");
}

#[test]
fn postfix_relays_into_postern() {
    let dns = TestDns::start(ZONE);
    let node = postern(&dns, 9);
    let pf = Postfix::relay_to(node.smtp);

    // What `sendmail` reads is the message itself: no dot-stuffing (and `-i`).
    let msg = unstuffed(&message("from-postfix", "alice@example.test"));
    pf.sendmail("sender@peer.test", &msg);
    pf.flush();

    let mut msgs = Vec::new();
    for _ in 0..300 {
        msgs = inbox(&node, "alice@example.test");
        if !msgs.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let context = |m: &[u8]| {
        format!(
            "message:\n{}\npostfix queue:\n{}\npostfix maillog:\n{}\npostern log:\n{}",
            String::from_utf8_lossy(m),
            pf.queue(),
            pf.maillog(),
            node.log()
        )
    };
    assert_eq!(msgs.len(), 1, "{}", context(b""));
    let got = &msgs[0];
    let ctx = context(got);
    // Postfix's cleanup changed nothing in a message that has all the required fields.
    assert_eq!(String::from_utf8_lossy(&strip_trace(got)), msg, "{ctx}");

    let all = headers(got);
    let rp = fields(&all, "Return-Path");
    assert_eq!(rp, ["Return-Path: <sender@peer.test>"], "{ctx}");
    let received = fields(&all, "Received");
    let theirs = received.iter().find(|r| r.contains("(Postfix")).expect(&ctx);
    // Added by Postfix's pickup for the locally submitted message.
    assert!(theirs.contains("by postfix.peer.test (Postfix, from userid 0)"), "{theirs}");
    let ours = received.iter().find(|r| r.contains("(Postern)")).expect(&ctx);
    assert!(ours.contains("from postfix.peer.test"), "{ours}");
    assert!(ours.contains("(version=TLS"), "Postfix's session to Postern was not TLS: {ours}");
    assert!(node.log().contains("smtp tls ciphers="), "{ctx}");
    // Postfix's client logged its side of STARTTLS and the delivery.
    let log = pf.maillog();
    assert!(log.contains("TLS connection established to 127.0.0.1["), "{ctx}");
    assert!(log.contains("to=<alice@example.test>, relay=127.0.0.1[127.0.0.1]"), "{ctx}");
    assert!(log.contains("status=sent (250"), "{ctx}");
}

/// The fields of a DSN, parsed with Python's `email` package: one `Name: value` line per field
/// of the top-level content type, each per-recipient field of the delivery-status part, and
/// the content type of each part.
fn parse_dsn(raw: &[u8]) -> String {
    const SCRIPT: &str = r#"
import email, sys
from email import policy
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
print("Top-Content-Type:", m.get_content_type())
print("Report-Type:", m.get_param("report-type"))
for part in m.walk():
    print("Part:", part.get_content_type())
    if part.get_content_type() == "message/delivery-status":
        for block in part.get_payload():
            for k, v in block.items():
                print(k + ":", " ".join(v.split()))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn postfix_rejects_and_postern_bounces() {
    let dns = TestDns::start(ZONE);
    // carol has no mailbox: Postfix answers RCPT with 550 5.1.1.
    let mx = Postfix::mx(&["dave"]);
    let node = postern(&dns, mx.addr.port());

    send_to_fwd(&node, "rejected", "alice@example.test");

    let mut msgs = Vec::new();
    for _ in 0..300 {
        msgs = inbox(&node, "alice@example.test");
        if !msgs.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ctx = format!(
        "alice's inbox: {:?}\npostfix maillog:\n{}\npostern log:\n{}",
        msgs.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>(),
        mx.maillog(),
        node.log()
    );
    assert_eq!(msgs.len(), 1, "{ctx}");
    assert!(mx.maillog().contains("User unknown in virtual mailbox table"), "{ctx}");

    let all = headers(&msgs[0]);
    // The local copy of a bounce records its null sender (RFC 5321 §4.4).
    let rp = fields(&all, "Return-Path");
    assert_eq!(rp, ["Return-Path: <>"], "a bounce has a null sender: {ctx}");
    let dsn = parse_dsn(&msgs[0]);
    let ctx = format!("parsed:\n{dsn}\n{ctx}");
    let has = |line: &str| dsn.lines().any(|l| l.eq_ignore_ascii_case(line));
    assert!(has("Top-Content-Type: multipart/report"), "{ctx}");
    assert!(has("Report-Type: delivery-status"), "{ctx}");
    assert!(has("Part: message/delivery-status"), "{ctx}");
    assert!(has("Action: failed"), "{ctx}");
    assert!(has("Status: 5.1.1"), "{ctx}");
    assert!(has("Final-Recipient: rfc822; carol@dest.example"), "{ctx}");
    assert!(has("Original-Recipient: rfc822; fwd@example.test"), "{ctx}");
    assert!(has("Remote-MTA: dns; mx.dest.example"), "{ctx}");
    let diag = dsn.lines().find(|l| l.starts_with("Diagnostic-Code:")).expect(&ctx);
    assert!(diag.starts_with("Diagnostic-Code: smtp; 550"), "{ctx}");
    assert!(diag.contains("5.1.1"), "{ctx}");
    // The failure was logged as such, and Postern tried once only: a 5xx is final.
    let failed: Vec<String> = queue_lines(&node).into_iter().filter(|l| l.contains("PermFail")).collect();
    assert_eq!(failed.len(), 1, "{ctx}");
    assert_eq!(mx.maillog().matches("NOQUEUE: reject: RCPT").count(), 1, "{ctx}");
}

/// The `Authentication-Results` fields OpenDKIM added as `postfix.peer.test`, whitespace
/// collapsed to single spaces.
fn opendkim_results(msg: &[u8]) -> Vec<String> {
    let all = headers(msg);
    fields(&all, "Authentication-Results")
        .into_iter()
        .map(|f| f.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|f| f.starts_with("Authentication-Results: postfix.peer.test;"))
        .collect()
}

/// The `dkim=` results of an Authentication-Results field: its `;`-separated parts outside
/// `(comments)` (OpenDKIM writes `dkim=pass (2048-bit key; unprotected) header.d=...`).
fn dkim_results(field: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut depth = 0u32;
    for c in field.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ';' if depth == 0 => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().unwrap().push(c);
    }
    parts.into_iter().map(|p| p.trim().to_string()).filter(|p| p.starts_with("dkim=")).collect()
}

#[test]
fn postfix_with_opendkim_sees_dkim_pass() {
    // Postern signs mail from example.test with an ed25519 and an RSA key (OpenDKIM 2.11 built
    // with OpenSSL 3 verifies both: `opendkim -V` lists ed25519-sha256).
    let keys = tempfile::tempdir().unwrap();
    let ed = keys.path().join("ed.key");
    let rsa = keys.path().join("rsa.key");
    opendkim::keygen(&["example.test", "-s", "ed1", "--out", ed.to_str().unwrap()]);
    opendkim::keygen(&["example.test", "-s", "rsa1", "-a", "rsa", "--out", rsa.to_str().unwrap()]);

    let dns = TestDns::start(ZONE);
    let milter = opendkim::OpenDkim::verifier(postfix::HOSTNAME);
    // A milter that fails makes Postfix answer 4xx: the message could not arrive unverified.
    let mx = Postfix::mx_with(
        &["carol"],
        &format!("smtpd_milters = {}\nmilter_default_action = tempfail\n", milter.milter()),
    );
    let node = Node::start(Setup {
        domains: vec!["example.test".into()],
        users: vec!["alice@example.test".into()],
        hostname: "mx.example.test".into(),
        node_extra: "listen.submission = [\"127.0.0.1:0\"]\n".into(),
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\n\
             [outbound]\nmx_port = {}\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\n\
             [[dkim]]\ndomain = \"example.test\"\nselector = \"ed1\"\nalgorithm = \"ed25519\"\nkey = {:?}\n\n\
             [[dkim]]\ndomain = \"example.test\"\nselector = \"rsa1\"\nalgorithm = \"rsa-sha256\"\nkey = {:?}\n",
            dns.addr(),
            mx.addr.port(),
            ed.display().to_string(),
            rsa.display().to_string()
        ),
        ..Setup::default()
    });
    // OpenDKIM asks dnsmasq for exactly the key records `postern dns-records` prints.
    let txt = opendkim::dkim_txt_records(&opendkim::dns_records(&node.config));
    let names: Vec<&str> = txt.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ed1._domainkey.example.test", "rsa1._domainkey.example.test"], "{txt:?}");
    let dnsmasq = opendkim::Dnsmasq::start(&txt);

    let body = "From: Alice <alice@example.test>\r\nTo: carol@dest.example\r\nSubject: signed for postfix\r\n\
                Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <opendkim1@example.test>\r\n\
                MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello   Carol,  \r\n\r\n\r\n";
    submit(&node, "alice@example.test", &["carol@dest.example"], body);

    let delivered = mx.wait_for_maildir("carol", 1, Duration::from_secs(30));
    let got = String::from_utf8_lossy(&delivered[0]).into_owned();
    let ctx = |got: &str| {
        format!(
            "delivered:\n{got}\npostfix maillog:\n{}\nopendkim:\n{}\ndnsmasq:\n{}\npostern log:\n{}",
            mx.maillog(),
            milter.log(),
            dnsmasq.log(),
            node.log()
        )
    };
    let results = opendkim_results(&delivered[0]);
    assert_eq!(results.len(), 1, "{}", ctx(&got));
    let ar = &results[0];
    // One result per signature, both passing, for d=example.test.
    let passes = dkim_results(ar);
    assert_eq!(passes.len(), 2, "{ar}\n{}", ctx(&got));
    for r in &passes {
        assert!(r.starts_with("dkim=pass"), "{r}\n{}", ctx(&got));
        assert!(r.contains("header.d=example.test"), "{r}\n{}", ctx(&got));
    }
    for sel in ["ed1", "rsa1"] {
        assert!(passes.iter().any(|r| r.contains(&format!("header.s={sel}"))), "{sel}: {ar}\n{}", ctx(&got));
    }
    assert!(dnsmasq.log().contains("ed1._domainkey.example.test"), "{}", ctx(&got));
    assert!(dnsmasq.log().contains("rsa1._domainkey.example.test"), "{}", ctx(&got));

    // The same signed message with its body changed, handed to Postfix directly: OpenDKIM
    // finds both signatures bad. The verifier is really checking.
    let text = got.replace("\r\n", "\n");
    let (head, rest) = text.split_once("\n\n").expect("a header/body split");
    let head: Vec<&str> = head.split('\n').collect();
    let mut kept = Vec::new();
    let mut skipping = false;
    for line in head {
        if line.starts_with([' ', '\t']) {
            if !skipping {
                kept.push(line);
            }
            continue;
        }
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        skipping = matches!(name.as_str(), "return-path" | "delivered-to" | "authentication-results");
        if !skipping {
            kept.push(line);
        }
    }
    let tampered = format!("{}\r\n\r\n{}", kept.join("\r\n"), rest.replace("Carol", "Mallory").replace('\n', "\r\n"));
    let mut d = Dialog::connect(mx.addr);
    assert_eq!(d.reply().0, 220);
    d.cmd("EHLO tamper.test", 250);
    d.cmd("MAIL FROM:<alice@example.test>", 250);
    d.cmd("RCPT TO:<carol@dest.example>", 250);
    d.cmd("DATA", 354);
    d.send_raw(tampered.replace("\r\n.", "\r\n..").as_bytes());
    d.send_raw(b".\r\n");
    let (code, reply) = d.reply();
    assert_eq!(code, 250, "{reply}\n{}", ctx(&got));
    d.send("QUIT");
    let both = mx.wait_for_maildir("carol", 2, Duration::from_secs(30));
    let bad = String::from_utf8_lossy(&both[1]).into_owned();
    assert!(bad.contains("Mallory"), "{}", ctx(&bad));
    let results = opendkim_results(&both[1]);
    assert_eq!(results.len(), 1, "{}", ctx(&bad));
    let verdicts = dkim_results(&results[0]);
    assert_eq!(verdicts.len(), 2, "{}", ctx(&bad));
    assert!(verdicts.iter().all(|r| r.starts_with("dkim=fail")), "{verdicts:?}\n{}", ctx(&bad));
    // Failed on the changed body, not for want of the key.
    assert!(
        verdicts.iter().all(|r| r.contains("reason=\"signature verification failed\"")),
        "{verdicts:?}\n{}",
        ctx(&bad)
    );
}
