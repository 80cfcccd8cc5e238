//! The outbound queue end to end: a Postern node forwards mail (alias targets outside its
//! cluster) by MX lookup against the in-process test DNS, to a second Postern node or to
//! Postfix's smtp-sink with its fault switches; retries, bounces, delay warnings, expiry,
//! restarts and kill -9.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::dns::TestDns;
use common::pebble::free_port;
use common::sink::Sink;
use common::*;

const ZONE: &str = "dest.example MX 10 mx.dest.example\nmx.dest.example A 127.0.0.1\nnomail.example MX 0 .\n";

/// The sending node: example.test, with aliases that forward to dest.example.
fn sender(dns: &TestDns, mx_port: u16, outbound: &str) -> Node {
    Node::start(Setup {
        domains: vec!["example.test".into()],
        users: vec!["alice@example.test".into()],
        hostname: "mx.example.test".into(),
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n\
             [outbound]\nmx_port = {mx_port}\nretry_initial = \"1s\"\nretry_max = \"2s\"\n{outbound}\n\
             [aliases]\n\"fwd@example.test\" = \"carol@dest.example\"\n\
             \"team@example.test\" = [\"alice@example.test\", \"carol@dest.example\", \"dan@dest.example\"]\n\
             \"void@example.test\" = \"someone@nomail.example\"\n",
            dns.addr()
        ),
        ..Setup::default()
    })
}

/// The receiving node: dest.example with carol and dan, on a fixed port.
fn receiver(port: u16) -> Node {
    Node::start(Setup {
        domains: vec!["dest.example".into()],
        users: vec!["carol@dest.example".into(), "dan@dest.example".into()],
        hostname: "mx.dest.example".into(),
        smtp_listen: format!("127.0.0.1:{port}"),
        ..Setup::default()
    })
}

fn header_count(msg: &[u8], name: &str) -> usize {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines().filter(|l| l.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase()))).count()
}

fn queue_len(node: &mut Node) -> usize {
    node.stop();
    let store = open_store(&node.data_dir());
    let n = store.queue_len().unwrap();
    drop(store);
    n
}

fn sink_dumps(sink: &Sink) -> Vec<String> {
    sink.dumps().iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
}

#[test]
fn forwards_to_another_node_by_mx_and_keeps_the_local_copy() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let rx = receiver(port);
    let mut tx = sender(&dns, port, "");
    let body = message("team1", "team@example.test");
    let (code, text) = send_message(&tx, "sender@peer.test", &["team@example.test"], &body);
    assert_eq!(code, 250, "{text}");
    // Two remote recipients at one domain: one connection, one transaction.
    wait_for("delivery to the second node", Duration::from_secs(20), || {
        inbox(&rx, "carol@dest.example").len() == 1 && inbox(&rx, "dan@dest.example").len() == 1
    });
    let carol = &inbox(&rx, "carol@dest.example")[0];
    assert_eq!(header_count(carol, "Return-Path"), 1, "{}", String::from_utf8_lossy(carol));
    assert_eq!(header_count(carol, "Received"), 2, "{}", String::from_utf8_lossy(carol));
    let text = String::from_utf8_lossy(carol);
    assert!(text.contains("Return-Path: <sender@peer.test>"), "{text}");
    assert!(text.contains("by mx.example.test (Postern)"), "{text}");
    assert!(text.contains("from mx.example.test"), "the receiver saw our EHLO name: {text}");
    assert!(text.contains("with ESMTPS"), "opportunistic STARTTLS was used: {text}");
    assert_eq!(strip_trace(carol), unstuffed(&body).as_bytes());
    assert_eq!(inbox(&tx, "alice@example.test").len(), 1);
    let log = tx.log();
    assert!(log.matches("result=Ok").count() >= 2, "{log}");
    assert!(log.contains("relay=mx.dest.example[127.0.0.1]"), "{log}");
    assert!(log.contains("tls=\"TLSv1_3") || log.contains("tls=\"TLSv1.3"), "{log}");
    assert_eq!(rx.log().matches("smtp connected").count(), 1, "one connection for both recipients");
    assert_eq!(queue_len(&mut tx), 0);
}

#[test]
fn receiver_down_then_up_is_retried() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let mut tx = sender(&dns, port, "");
    let (code, _) = send_message(&tx, "sender@peer.test", &["fwd@example.test"], &message("down1", "fwd@example.test"));
    assert_eq!(code, 250);
    wait_for("a deferred attempt", Duration::from_secs(20), || tx.log().contains("result=deferred"));
    let rx = receiver(port);
    wait_for("delivery after the receiver came up", Duration::from_secs(20), || {
        inbox(&rx, "carol@dest.example").len() == 1
    });
    assert_eq!(queue_len(&mut tx), 0);
}

#[test]
fn temporary_rejection_then_success() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let sink = Sink::start_at(port, &["-r", "RCPT"]);
    let tx = sender(&dns, port, "");
    send_message(&tx, "sender@peer.test", &["fwd@example.test"], &message("soft1", "fwd@example.test"));
    wait_for("a 4xx deferral", Duration::from_secs(20), || tx.log().contains("result=deferred"));
    assert!(sink_dumps(&sink).iter().all(|d| !d.contains("Subject: test soft1")));
    sink.stop();
    let sink = Sink::start_at(port, &[]);
    wait_for("delivery after the 4xx", Duration::from_secs(20), || {
        sink_dumps(&sink).iter().any(|d| d.contains("Subject: test soft1"))
    });
    let dump = sink_dumps(&sink).into_iter().find(|d| d.contains("Subject: test soft1")).unwrap();
    assert!(dump.contains("carol@dest.example"), "{dump}");
    assert!(!dump.contains("Return-Path:"), "no Return-Path leaves the node: {dump}");
    // No DSN for a temporary failure.
    assert!(!tx.log().contains(" bounce to="), "{}", tx.log());
}

/// Finds the multipart/report in a mailbox and returns (content-type line, delivery-status part).
fn report(msgs: &[Vec<u8>], action: &str) -> Option<String> {
    msgs.iter().map(|m| String::from_utf8_lossy(m).to_string()).find(|m| {
        m.contains("multipart/report")
            && m.contains("report-type=\"delivery-status\"")
            && m.contains(&format!("Action: {action}"))
    })
}

#[test]
fn permanent_rejection_bounces_to_the_local_sender_once() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let _sink = Sink::start_at(port, &["-f", "RCPT"]);
    let tx = sender(&dns, port, "");
    let body = message("hard1", "fwd@example.test");
    send_message(&tx, "alice@example.test", &["fwd@example.test"], &body);
    wait_for("the bounce in alice's INBOX", Duration::from_secs(20), || {
        report(&inbox(&tx, "alice@example.test"), "failed").is_some()
    });
    let dsn = report(&inbox(&tx, "alice@example.test"), "failed").unwrap();
    for needle in [
        "Return-Path: <>",
        "From: \"Mail Delivery System\"",
        "Auto-Submitted: auto-replied",
        "Reporting-MTA: dns; mx.example.test",
        "Final-Recipient: rfc822; carol@dest.example",
        "Original-Recipient: rfc822; fwd@example.test",
        "Action: failed",
        "Status: 5.",
        "Diagnostic-Code: smtp; 5",
        "Content-Type: text/rfc822-headers",
        "Subject: test hard1",
    ] {
        assert!(dsn.contains(needle), "{needle:?} missing from the DSN:\n{dsn}");
    }
    assert!(!dsn.contains("Hello hard1."), "the original body is not echoed back");
    // Python's email package reads it as a delivery report.
    let out = python_imap(
        &tx,
        &format!(
            "import email\nm = email.message_from_bytes(bytes.fromhex({:?}))\n\
             parts = [p.get_content_type() for p in m.walk()]\nprint(m.get_content_type(), m.get_param('report-type'), parts)\n\
             st = [p for p in m.walk() if p.get_content_type() == 'message/delivery-status'][0]\n\
             print([dict(g.items()) for g in st.get_payload()][1]['Action'])\n",
            dsn.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    );
    assert!(out.contains("multipart/report delivery-status"), "{out}");
    assert!(out.contains("message/delivery-status") && out.contains("text/rfc822-headers"), "{out}");
    assert!(out.trim_end().ends_with("failed"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(inbox(&tx, "alice@example.test").len(), 1, "exactly one bounce, no retries of a 5xx");
}

#[test]
fn no_bounce_for_a_bounce_and_null_mx_fails_fast() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let _sink = Sink::start_at(port, &["-f", "RCPT"]);
    let mut tx = sender(&dns, port, "");
    // A null-sender message that fails: nobody to tell.
    send_message(&tx, "", &["fwd@example.test"], &message("nullsender", "fwd@example.test"));
    wait_for("the failure", Duration::from_secs(20), || tx.log().contains("result=failed"));
    wait_for("the refusal to bounce", Duration::from_secs(5), || tx.log().contains("no bounce"));
    // Null MX (RFC 7505): a bounce at the first attempt, no retries.
    send_message(&tx, "alice@example.test", &["void@example.test"], &message("nullmx", "void@example.test"));
    wait_for("the null-MX bounce", Duration::from_secs(20), || {
        report(&inbox(&tx, "alice@example.test"), "failed").is_some_and(|d| d.contains("Status: 5.1.10"))
    });
    assert_eq!(queue_len(&mut tx), 0);
}

#[test]
fn delay_warning_then_expiry_bounce() {
    let dns = TestDns::start(ZONE);
    let port = free_port(); // nothing listens there
    let mut tx = sender(&dns, port, "lifetime = \"6s\"\ndelay_warning = \"2s\"\n");
    send_message(&tx, "alice@example.test", &["fwd@example.test"], &message("late1", "fwd@example.test"));
    wait_for("the delay warning", Duration::from_secs(20), || {
        report(&inbox(&tx, "alice@example.test"), "delayed").is_some()
    });
    let warning = report(&inbox(&tx, "alice@example.test"), "delayed").unwrap();
    assert!(warning.contains("Subject: Delayed Mail"), "{warning}");
    assert!(warning.contains("Will-Retry-Until:"), "{warning}");
    assert!(warning.contains("Status: 4.4.7"), "{warning}");
    wait_for("the expiry bounce", Duration::from_secs(30), || {
        report(&inbox(&tx, "alice@example.test"), "failed").is_some()
    });
    let bounce = report(&inbox(&tx, "alice@example.test"), "failed").unwrap();
    assert!(bounce.contains("delivery time expired"), "{bounce}");
    assert!(bounce.contains("Connection refused") || bounce.contains("connect"), "last error quoted: {bounce}");
    let msgs = inbox(&tx, "alice@example.test");
    assert_eq!(msgs.len(), 2, "one warning, one bounce");
    assert_eq!(queue_len(&mut tx), 0);
}

fn message_ids(dumps: &[String]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for d in dumps {
        if let Some(line) = d.lines().find(|l| l.starts_with("Message-ID: <")) {
            *seen.entry(line.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn restart_with_a_thousand_queued_delivers_each_once() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let mut tx = sender(&dns, port, "");
    for batch in 0..10 {
        let mut d = smtp(&tx);
        for i in 0..100 {
            let id = format!("bulk{}", batch * 100 + i);
            d.cmd("MAIL FROM:<sender@peer.test>", 250);
            d.cmd("RCPT TO:<fwd@example.test>", 250);
            d.cmd("DATA", 354);
            d.send_raw(message(&id, "fwd@example.test").as_bytes());
            d.cmd(".", 250);
        }
        d.send("QUIT");
    }
    tx.stop();
    let store = open_store(&tx.data_dir());
    assert_eq!(store.queue_len().unwrap(), 1000);
    drop(store);
    tx.launch();
    let sink = Sink::start_at(port, &[]);
    wait_for("1000 deliveries", Duration::from_secs(120), || message_ids(&sink_dumps(&sink)).len() == 1000);
    std::thread::sleep(Duration::from_secs(1));
    let ids = message_ids(&sink_dumps(&sink));
    assert_eq!(ids.len(), 1000);
    assert!(ids.values().all(|&n| n == 1), "a clean restart delivers nothing twice");
    assert_eq!(queue_len(&mut tx), 0);
}

#[test]
fn kill_9_mid_delivery_loses_nothing() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    // A slow receiver: each DATA waits, so deliveries are in flight when the node dies.
    let sink = Sink::start_at(port, &["-w", "2"]);
    let mut tx = sender(&dns, port, "");
    for i in 0..20 {
        let (code, _) = send_message(
            &tx,
            "sender@peer.test",
            &["fwd@example.test"],
            &message(&format!("k{i}"), "fwd@example.test"),
        );
        assert_eq!(code, 250);
    }
    std::thread::sleep(Duration::from_millis(1500));
    tx.kill9();
    tx.launch();
    wait_for("all 20 delivered", Duration::from_secs(60), || message_ids(&sink_dumps(&sink)).len() == 20);
    let ids = message_ids(&sink_dumps(&sink));
    // At least once: the ones in flight at the kill may arrive twice; none is lost.
    let duplicates: usize = ids.values().map(|n| n - 1).sum();
    assert!(duplicates <= 20 && ids.values().all(|&n| n <= 2), "at most one duplicate each: {ids:?}");
    assert_eq!(queue_len(&mut tx), 0);
}

#[test]
fn submitted_mail_reaches_another_node() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let rx = receiver(port);
    let tx = Node::start(Setup {
        domains: vec!["example.test".into()],
        users: vec!["alice@example.test".into()],
        node_extra: "listen.submission = [\"127.0.0.1:0\"]\nlisten.submissions = [\"127.0.0.1:0\"]\n".into(),
        extra: format!("[dns]\nnameservers = [\"{}\"]\n[outbound]\nmx_port = {port}\n", dns.addr()),
        ..Setup::default()
    });
    let s587 = format!("127.0.0.1:{}", tx.addr("submission").port());
    let out = std::process::Command::new("swaks")
        .args(["--server", &s587, "--tls", "--auth", "PLAIN", "--auth-user", "alice@example.test"])
        .args(["--auth-password", PASSWORD, "--from", "alice@example.test", "--to", "carol@dest.example"])
        .args(["--header", "Subject: via swaks", "--helo", "swaks.test", "--timeout", "20"])
        .output()
        .expect("swaks");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), tx.log());
    let script = format!(
        "import smtplib\ns = smtplib.SMTP(HOST, {}, timeout=20)\ns.starttls(context=tls())\n\
         s.login('alice@example.test', PASSWORD)\n\
         s.sendmail('alice@example.test', ['dan@dest.example'], b'From: alice@example.test\\r\\nTo: dan@dest.example\\r\\nSubject: via smtplib\\r\\n\\r\\nHi Dan.\\r\\n')\n\
         s.quit()\nprint('sent')\n",
        tx.addr("submission").port()
    );
    assert_eq!(python_imap(&tx, &script).trim(), "sent");
    wait_for("both messages at the other node", Duration::from_secs(20), || {
        inbox(&rx, "carol@dest.example").len() == 1 && inbox(&rx, "dan@dest.example").len() == 1
    });
    let carol = String::from_utf8_lossy(&inbox(&rx, "carol@dest.example")[0]).to_string();
    assert!(carol.contains("Subject: via swaks") && carol.contains("with ESMTPSA"), "{carol}");
    let dan = String::from_utf8_lossy(&inbox(&rx, "dan@dest.example")[0]).to_string();
    // RFC 6409 §8: the submission server completed the header section.
    assert!(dan.contains("\r\nMessage-ID: <") && dan.contains("\r\nDate: "), "{dan}");
    assert!(dan.contains("Return-Path: <alice@example.test>"), "{dan}");
}

/// A node whose outbound mail all goes through a smarthost: a second Postern node that accepts
/// authenticated submission and delivers by MX to smtp-sink.
#[test]
fn smarthost_with_auth_over_smtps_and_starttls() {
    let dns = TestDns::start(ZONE);
    let sink_port = free_port();
    let sink = Sink::start_at(sink_port, &[]);
    let relay_user = format!(
        "[users.\"relayuser@relay.example\"]\npassword = \"{}\"\nsend_as = [\"@peer.test\", \"@example.test\"]\n",
        postern::auth::hash_password(PASSWORD)
    );
    let relay = Node::start(Setup {
        domains: vec!["relay.example".into()],
        users: vec![],
        hostname: "smarthost.relay.example".into(),
        node_extra: "listen.submission = [\"127.0.0.1:0\"]\nlisten.submissions = [\"127.0.0.1:0\"]\n".into(),
        extra: format!("{relay_user}[dns]\nnameservers = [\"{}\"]\n[outbound]\nmx_port = {sink_port}\n", dns.addr()),
        ..Setup::default()
    });
    let secrets = tempfile::tempdir().unwrap();
    let pass = secrets.path().join("relay.pass");
    std::fs::write(&pass, format!("{PASSWORD}\n")).unwrap();
    let mut senders = Vec::new();
    for (proto, scheme) in [("submissions", "smtps"), ("submission", "smtp")] {
        let url = format!("{scheme}://relayuser@relay.example@127.0.0.1:{}", relay.addr(proto).port());
        let node = Node::start(Setup {
            domains: vec!["example.test".into()],
            users: vec!["alice@example.test".into()],
            extra: format!(
                "[outbound]\nrelay = \"{url}\"\nrelay_password_file = {:?}\nca_file = {:?}\n\
                 [aliases]\n\"fwd@example.test\" = \"carol@dest.example\"\n",
                pass.display().to_string(),
                relay.cert.display().to_string()
            ),
            ..Setup::default()
        });
        let (code, _) =
            send_message(&node, "sender@peer.test", &["fwd@example.test"], &message(scheme, "fwd@example.test"));
        assert_eq!(code, 250);
        senders.push(node);
    }
    wait_for("both relayed messages at the final MX", Duration::from_secs(30), || {
        let ids = message_ids(&sink_dumps(&sink));
        ids.contains_key("Message-ID: <smtps@peer.test>") && ids.contains_key("Message-ID: <smtp@peer.test>")
    });
    for node in &senders {
        let log = node.log();
        assert!(log.contains("relay=127.0.0.1[127.0.0.1]") && log.contains(" verified\""), "{log}");
        assert!(!log.contains(PASSWORD), "the relay password never reaches the log");
    }
    let relay_log = relay.log();
    assert_eq!(relay_log.matches("smtp auth user=relayuser@relay.example result=ok").count(), 2, "{relay_log}");
}

/// `[outbound.routes]` sends one domain's mail to a fixed host, with no MX lookup at all (the
/// node's resolver points at a port where nothing answers).
#[test]
fn per_domain_route_skips_mx() {
    let sink = Sink::start(&[]);
    let (_silent, dead_dns) = common::dns::silent_server();
    let node = Node::start(Setup {
        domains: vec!["example.test".into()],
        users: vec!["alice@example.test".into()],
        extra: format!(
            "[dns]\nnameservers = [\"{dead_dns}\"]\ntimeout = \"1s\"\n\
             [inbound]\nchecks = false\n\
             [outbound.routes]\n\"dest.example\" = \"smtp://127.0.0.1:{}\"\n\
             [aliases]\n\"fwd@example.test\" = \"carol@dest.example\"\n",
            sink.addr.port()
        ),
        ..Setup::default()
    });
    // (Inbound checks are off: they would need the DNS this test keeps silent.)
    let (code, text) =
        send_message(&node, "sender@peer.test", &["fwd@example.test"], &message("routed", "fwd@example.test"));
    assert_eq!(code, 250, "{text}");
    wait_for("the routed message", Duration::from_secs(20), || {
        message_ids(&sink_dumps(&sink)).contains_key("Message-ID: <routed@peer.test>")
    });
    assert!(node.log().contains("relay=127.0.0.1[127.0.0.1]"), "{}", node.log());
}
