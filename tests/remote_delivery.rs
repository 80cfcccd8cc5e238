//! The outbound SMTP client against a real postern node and against Postfix's smtp-sink.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::sink::Sink;
use common::{inbox, strip_trace, Node, Setup};
use postern::delivery::remote::{ClientConfig, Envelope, IterSource, RcptOutcome, SessionError, SmtpClient, TlsPolicy};

fn roots_from(pem: Option<&Path>) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(p) = pem {
        let data = std::fs::read(p).unwrap();
        for c in rustls_pemfile::certs(&mut &data[..]) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    Arc::new(roots)
}

fn config(roots: Arc<rustls::RootCertStore>, tls: TlsPolicy) -> ClientConfig {
    let mut c = ClientConfig::new("out.peer.test", roots);
    c.tls = tls;
    c.command_timeout = Duration::from_secs(20);
    c.data_timeout = Duration::from_secs(20);
    c
}

fn message(id: &str) -> String {
    format!(
        "From: Sender <sender@peer.test>\r\nTo: alice@example.test\r\nSubject: out {id}\r\n\
         Message-ID: <{id}@peer.test>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello {id}.\r\n"
    )
}

fn envelope<'a>(rcpts: &'a [String], body: &[u8]) -> Envelope<'a> {
    Envelope { from: "sender@peer.test", recipients: rcpts, size: body.len() as u64, eight_bit: false, smtputf8: false }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_verified_to_two_recipients() {
    let node = Node::start(Setup::default());
    let cfg = config(roots_from(Some(&node.cert)), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(node.smtp, "localhost", &cfg).await.unwrap();
    assert!(client.capabilities().pipelining && client.capabilities().eight_bit_mime);
    let body = message("verified");
    let rcpts = strings(&["alice@example.test", "bob@example.test"]);
    let report = client.send(&envelope(&rcpts, body.as_bytes()), body.as_bytes()).await.unwrap();
    client.quit().await;
    let tls = report.tls.clone().expect("tls");
    assert!(tls.verified, "{tls:?}");
    assert_eq!(tls.verify_error, None);
    assert_eq!(report.recipients, vec![RcptOutcome::Accepted, RcptOutcome::Accepted]);
    assert_eq!(report.data_reply.as_ref().map(|r| r.code), Some(250));
    for user in ["alice@example.test", "bob@example.test"] {
        let msgs = inbox(&node, user);
        assert_eq!(msgs.len(), 1, "{user}");
        assert_eq!(strip_trace(&msgs[0]), body.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn opportunistic_delivers_despite_unverified_certificate() {
    let node = Node::start(Setup::default());
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(node.smtp, "localhost", &cfg).await.unwrap();
    let body = message("unverified");
    let rcpts = strings(&["alice@example.test"]);
    let report = client.send(&envelope(&rcpts, body.as_bytes()), body.as_bytes()).await.unwrap();
    client.quit().await;
    let tls = report.tls.clone().expect("tls");
    assert!(!tls.verified);
    assert!(tls.verify_error.is_some());
    assert!(report.all_accepted());
    let msgs = inbox(&node, "alice@example.test");
    assert_eq!(msgs.len(), 1);
    assert_eq!(strip_trace(&msgs[0]), body.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_stuffing_and_mixed_recipients() {
    let node = Node::start(Setup::default());
    // Trusted cert but the wrong name: verification fails on the name, delivery goes on.
    let cfg = config(roots_from(Some(&node.cert)), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(node.smtp, "mx.other.test", &cfg).await.unwrap();
    assert!(!client.tls().unwrap().verified);
    let body = format!("{}.leading dot\r\n.\r\n..two dots\r\nend.\r\n.", message("dots"));
    // Split right before every dot, so each one starts a chunk.
    let bytes = body.as_bytes();
    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'.' && i > from {
            chunks.push(&bytes[from..i]);
            from = i;
        }
    }
    chunks.push(&bytes[from..]);
    assert!(chunks.len() > 5);
    let rcpts = strings(&["alice@example.test", "nobody@example.test", "x@elsewhere.example", "bob@example.test"]);
    let env = envelope(&rcpts, bytes);
    let report = client.send(&env, IterSource(chunks.into_iter().map(Ok))).await.unwrap();
    assert_eq!(report.recipients[0], RcptOutcome::Accepted);
    assert_eq!(report.recipients[3], RcptOutcome::Accepted);
    let RcptOutcome::Permanent(r) = &report.recipients[1] else { panic!("{:?}", report.recipients) };
    assert_eq!((r.code, r.enhanced.as_deref()), (550, Some("5.1.1")));
    let RcptOutcome::Permanent(r) = &report.recipients[2] else { panic!("{:?}", report.recipients) };
    assert_eq!((r.code, r.enhanced.as_deref()), (550, Some("5.7.1")));

    // The connection takes another transaction, and a failed one in between.
    let none = strings(&["nobody@example.test"]);
    let second = message("second");
    let r = client.send(&envelope(&none, second.as_bytes()), second.as_bytes()).await.unwrap();
    assert!(matches!(r.recipients[0], RcptOutcome::Permanent(_)));
    assert_eq!(r.data_reply, None);
    let bob = strings(&["bob@example.test"]);
    let r = client.send(&envelope(&bob, second.as_bytes()), second.as_bytes()).await.unwrap();
    assert!(r.all_accepted());
    client.quit().await;

    // The body ended without CRLF: the client added one.
    let want = format!("{body}\r\n");
    let alice = inbox(&node, "alice@example.test");
    assert_eq!(alice.len(), 1);
    assert_eq!(String::from_utf8_lossy(&strip_trace(&alice[0])), want);
    let bob_msgs = inbox(&node, "bob@example.test");
    assert_eq!(bob_msgs.len(), 2);
    assert_eq!(strip_trace(&bob_msgs[0]), want.as_bytes());
    assert_eq!(strip_trace(&bob_msgs[1]), second.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn required_tls_refuses_unverified_peer() {
    let node = Node::start(Setup::default());
    let cfg = config(roots_from(None), TlsPolicy::Required);
    let err = SmtpClient::connect(node.smtp, "localhost", &cfg).await.err().expect("must fail");
    assert!(matches!(err, SessionError::Tls(_)), "{err:?}");
    assert!(!err.is_permanent());
    // With the right trust it works.
    let cfg = config(roots_from(Some(&node.cert)), TlsPolicy::Required);
    let client = SmtpClient::connect(node.smtp, "localhost", &cfg).await.unwrap();
    assert!(client.tls().unwrap().verified);
    client.quit().await;
    assert!(inbox(&node, "alice@example.test").is_empty());
}

#[tokio::test]
async fn connection_refused_is_temporary() {
    let port = free_port();
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let err = SmtpClient::connect(SocketAddr::from(([127, 0, 0, 1], port)), "localhost", &cfg).await.err().unwrap();
    assert!(matches!(err, SessionError::Connect(_)), "{err:?}");
    assert!(!err.is_permanent());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_sink_accepts() {
    let sink = Sink::start(&[]);
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(sink.addr, "localhost", &cfg).await.unwrap();
    assert!(client.tls().is_none());
    let body = format!("{}.dot line\r\n", message("sink"));
    let rcpts = strings(&["a@sink.test", "b@sink.test"]);
    let mut env = envelope(&rcpts, body.as_bytes());
    env.eight_bit = true;
    let report = client.send(&env, body.as_bytes()).await.unwrap();
    client.quit().await;
    assert!(report.all_accepted(), "{report:?}");
    common::wait_for("dump", Duration::from_secs(5), || !sink.dumps().is_empty());
    let dump = std::fs::read_to_string(&sink.dumps()[0]).unwrap();
    assert!(dump.contains("X-Rcpt-Args: <a@sink.test>") || dump.contains("a@sink.test"), "{dump}");
    assert!(dump.contains("BODY=8BITMIME"), "{dump}");
    assert!(dump.contains("Subject: out sink"), "{dump}");
    assert!(dump.contains("\n.dot line"), "{dump}");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_sink_soft_rcpt_rejects_are_temporary() {
    // -r implies no PIPELINING: this also runs the one-command-at-a-time path.
    let sink = Sink::start(&["-r", "RCPT"]);
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(sink.addr, "localhost", &cfg).await.unwrap();
    assert!(!client.capabilities().pipelining);
    let body = message("soft");
    let rcpts = strings(&["a@sink.test", "b@sink.test"]);
    let report = client.send(&envelope(&rcpts, body.as_bytes()), body.as_bytes()).await.unwrap();
    for r in &report.recipients {
        assert!(matches!(r, RcptOutcome::Temporary(reply) if reply.code == 450), "{r:?}");
    }
    assert_eq!(report.data_reply, None);
    client.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_sink_data_rejects() {
    let sink = Sink::start(&["-f", "DATA"]);
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(sink.addr, "localhost", &cfg).await.unwrap();
    let body = message("hard");
    let rcpts = strings(&["a@sink.test"]);
    let err = client.send(&envelope(&rcpts, body.as_bytes()), body.as_bytes()).await.err().unwrap();
    assert!(matches!(&err, SessionError::Rejected { stage: "DATA", reply } if reply.code == 500), "{err:?}");
    assert!(err.is_permanent());
    client.quit().await;

    // 4xx after the final dot: each accepted recipient takes that outcome.
    let sink = Sink::start(&["-r", "."]);
    let mut client = SmtpClient::connect(sink.addr, "localhost", &cfg).await.unwrap();
    let report = client.send(&envelope(&rcpts, body.as_bytes()), body.as_bytes()).await.unwrap();
    assert!(matches!(&report.recipients[0], RcptOutcome::Temporary(r) if r.code == 450), "{report:?}");
    client.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_bit_needs_8bitmime() {
    // Without ESMTP the client falls back to HELO and knows no extensions.
    let sink = Sink::start(&["-e"]);
    let cfg = config(roots_from(None), TlsPolicy::Opportunistic);
    let mut client = SmtpClient::connect(sink.addr, "localhost", &cfg).await.unwrap();
    assert!(!client.capabilities().esmtp);
    let body = message("8bit");
    let rcpts = strings(&["a@sink.test"]);
    let mut env = envelope(&rcpts, body.as_bytes());
    env.eight_bit = true;
    let err = client.send(&env, body.as_bytes()).await.err().unwrap();
    assert!(matches!(err, SessionError::Unsupported(_)) && err.is_permanent(), "{err:?}");
    // The connection is still usable for a 7-bit message.
    env.eight_bit = false;
    assert!(client.send(&env, body.as_bytes()).await.unwrap().all_accepted());
    client.quit().await;
}
