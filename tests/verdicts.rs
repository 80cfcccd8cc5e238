//! Inbound verdicts on port 25 (issue 5): SPF, DKIM and DMARC for sender domains served by the
//! test DNS, the one Authentication-Results field the node prepends, and the policy (reject with
//! 550 5.7.1, Junk, tempfail with 451 4.7.0). DKIM signatures are made by dkimpy.

mod common;

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::dns::TestDns;
use common::*;

/// An RSA key pair made once per test binary: (private key PEM, public key base64 DER).
fn key() -> &'static (String, String) {
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    KEY.get_or_init(|| {
        let out = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .expect("openssl");
        assert!(out.status.success());
        let private = String::from_utf8(out.stdout).unwrap();
        let mut child = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(private.as_bytes()).unwrap();
        let der = child.wait_with_output().unwrap().stdout;
        use base64::Engine as _;
        (private, base64::engine::general_purpose::STANDARD.encode(der))
    })
}

/// `message` with a DKIM-Signature of `domain` (selector `sel`) in front, by dkimpy (the
/// system's Python, where the Debian package puts it).
fn sign(message: &str, domain: &str) -> String {
    let script = format!(
        "import dkim, sys\nmsg = sys.stdin.buffer.read()\nkey = {:?}.encode()\n\
         sig = dkim.sign(msg, b'sel', {:?}.encode(), key, include_headers=[b'from', b'to', b'subject', b'date', b'message-id'])\n\
         sys.stdout.buffer.write(sig + msg)\n",
        key().0,
        domain
    );
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn zone() -> String {
    let public = &key().1;
    format!(
        "pass.test TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
         sel._domainkey.pass.test TXT \"v=DKIM1; k=rsa; p={public}\"\n\
         _dmarc.pass.test TXT \"v=DMARC1; p=reject\"\n\
         reject.test TXT \"v=spf1 -all\"\n\
         _dmarc.reject.test TXT \"v=DMARC1; p=reject\"\n\
         quarantine.test TXT \"v=spf1 -all\"\n\
         _dmarc.quarantine.test TXT \"v=DMARC1; p=quarantine\"\n\
         soft.test TXT \"v=spf1 ~all\"\n\
         neutral.test TXT \"v=spf1 ?all\"\n\
         temp.test SERVFAIL\n\
         perm.test TXT \"v=spf1 ip4:not-an-address -all\"\n\
         unaligned.test TXT \"v=spf1 -all\"\n\
         _dmarc.unaligned.test TXT \"v=DMARC1; p=none\"\n"
    )
}

fn start(dns: &TestDns, inbound: &str) -> Node {
    Node::start(Setup {
        extra: format!("[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n{inbound}", dns.addr()),
        ..Setup::default()
    })
}

fn mail(from_domain: &str, id: &str) -> String {
    format!(
        "From: Sender <sender@{from_domain}>\r\nTo: alice@example.test\r\nSubject: test {id}\r\n\
         Message-ID: <{id}@{from_domain}>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello {id}.\r\n"
    )
}

/// The first Authentication-Results field of a stored message, unfolded.
fn auth_results(stored: &[u8]) -> String {
    let text = String::from_utf8_lossy(stored);
    let start = text.find("Authentication-Results: ").expect("an Authentication-Results field");
    let rest = &text[start..];
    let mut end = rest.find("\r\n").unwrap();
    while rest[end + 2..].starts_with([' ', '\t']) {
        end += 2 + rest[end + 2..].find("\r\n").unwrap();
    }
    rest[..end].replace("\r\n\t", " ").replace("\r\n ", " ")
}

/// The message with `id` in alice's mailbox `mailbox`, raw.
fn find(node: &Node, mailbox: &str, id: &str) -> Option<Vec<u8>> {
    let messages = if mailbox == "INBOX" {
        inbox(node, "alice@example.test")
    } else {
        let out = python_imap(
            node,
            &format!(
                "m = login('alice@example.test')\ntyp, _ = m.select({mailbox:?}, readonly=True)\nmsgs = []\n\
                 if typ == 'OK':\n    typ, data = m.uid('FETCH', '1:*', '(BODY.PEEK[])')\n    \
                 msgs = [d[1].hex() for d in data if isinstance(d, tuple)]\nprint(json.dumps(msgs))\n"
            ),
        );
        serde_json_lite(&out)
            .into_iter()
            .map(|h| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect())
            .collect()
    };
    messages.into_iter().find(|m| String::from_utf8_lossy(m).contains(&format!("Subject: test {id}\r\n")))
}

#[test]
fn spf_dkim_dmarc_results_and_policy() {
    let dns = TestDns::start(&zone());
    let node = start(&dns, "");

    // Everything passes.
    let signed = sign(&mail("pass.test", "p1"), "pass.test");
    assert_eq!(send_message(&node, "bounce@pass.test", &["alice@example.test"], &signed).0, 250, "{}", node.log());
    let stored = find(&node, "INBOX", "p1").expect("delivered");
    let ar = auth_results(&stored);
    assert!(ar.starts_with("Authentication-Results: mx.example.test;"), "{ar}");
    for part in [
        "spf=pass",
        "smtp.mailfrom=bounce@pass.test",
        "dkim=pass header.i=@pass.test header.s=sel",
        "dmarc=pass header.from=pass.test",
    ] {
        assert!(ar.contains(part), "{part} missing in {ar}");
    }
    assert_eq!(String::from_utf8_lossy(&stored).matches("Authentication-Results:").count(), 1);

    // SPF fails, no DKIM, p=reject: refused at the end of DATA.
    let (code, text) = send_message(&node, "x@reject.test", &["alice@example.test"], &mail("reject.test", "r1"));
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1"), "{text}");
    assert!(find(&node, "INBOX", "r1").is_none());

    // p=quarantine: delivered to Junk.
    let (code, _) = send_message(&node, "x@quarantine.test", &["alice@example.test"], &mail("quarantine.test", "q1"));
    assert_eq!(code, 250);
    let junk = find(&node, "Junk", "q1").expect("in Junk");
    let ar = auth_results(&junk);
    assert!(ar.contains("spf=fail") && ar.contains("dmarc=fail") && ar.contains("policy.dmarc=quarantine"), "{ar}");
    assert!(find(&node, "INBOX", "q1").is_none());

    // softfail, neutral and permerror are recorded, and the mail accepted.
    for (domain, id, result) in [
        ("soft.test", "s1", "spf=softfail"),
        ("neutral.test", "n1", "spf=neutral"),
        ("perm.test", "e1", "spf=permerror"),
    ] {
        let (code, text) = send_message(&node, &format!("x@{domain}"), &["alice@example.test"], &mail(domain, id));
        assert_eq!(code, 250, "{domain}: {text}");
        let ar = auth_results(&find(&node, "INBOX", id).expect("delivered"));
        assert!(ar.contains(result) && ar.contains("dkim=none") && ar.contains("dmarc=none"), "{ar}");
    }

    // SERVFAIL on the sender's SPF record: try again later, not a pass.
    let (code, text) = send_message(&node, "x@temp.test", &["alice@example.test"], &mail("temp.test", "t1"));
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.7.0"), "{text}");

    // DKIM passes for another domain than From's: DMARC fails (p=none, so delivered).
    let signed = sign(&mail("unaligned.test", "u1"), "pass.test");
    let (code, text) = send_message(&node, "bounce@pass.test", &["alice@example.test"], &signed);
    assert_eq!(code, 250, "{text}");
    let ar = auth_results(&find(&node, "INBOX", "u1").expect("delivered"));
    assert!(
        ar.contains("dkim=pass header.i=@pass.test header.s=sel")
            && ar.contains("dmarc=fail (policy not aligned) header.from=unaligned.test"),
        "{ar}"
    );

    // Senders without any records (NXDOMAIN): none everywhere, accepted.
    let (code, _) = send_message(&node, "x@nowhere.test", &["alice@example.test"], &mail("nowhere.test", "x1"));
    assert_eq!(code, 250);
    let ar = auth_results(&find(&node, "INBOX", "x1").expect("delivered"));
    assert!(ar.contains("spf=none") && ar.contains("dmarc=none"), "{ar}");

    let log = node.log();
    assert!(log.contains("verdict from=<x@reject.test>") && log.contains("action=reject-550"), "{log}");
}

#[test]
fn forged_authentication_results_are_removed() {
    let dns = TestDns::start(&zone());
    let node = start(&dns, "");
    let body = format!(
        "Authentication-Results: mx.example.test; dkim=pass header.d=reject.test\r\n\
         Authentication-Results: other.example;\r\n\tspf=pass smtp.mailfrom=x@other.example\r\n{}",
        mail("soft.test", "f1")
    );
    assert_eq!(send_message(&node, "x@soft.test", &["alice@example.test"], &body).0, 250);
    let stored = String::from_utf8(find(&node, "INBOX", "f1").expect("delivered")).unwrap();
    assert_eq!(stored.matches("Authentication-Results: mx.example.test").count(), 1, "{stored}");
    assert!(!stored.contains("header.d=reject.test"), "{stored}");
    assert!(stored.contains("Authentication-Results: other.example;\r\n\tspf=pass"), "{stored}");
    // Ours comes right below our Received field, above everything the sender wrote.
    let ours = stored.find("Authentication-Results: mx.example.test;").unwrap();
    assert!(stored.find("Received: from client.test").unwrap() < ours, "{stored}");
    assert!(ours < stored.find("Authentication-Results: other.example").unwrap(), "{stored}");
}

#[test]
fn policy_can_be_relaxed() {
    let dns = TestDns::start(&zone());
    let node = start(&dns, "[inbound]\ndmarc_reject = \"junk\"\ntempfail = false\n");
    let (code, _) = send_message(&node, "x@reject.test", &["alice@example.test"], &mail("reject.test", "r2"));
    assert_eq!(code, 250);
    assert!(find(&node, "Junk", "r2").is_some());
    let (code, _) = send_message(&node, "x@temp.test", &["alice@example.test"], &mail("temp.test", "t2"));
    assert_eq!(code, 250);
    let ar = auth_results(&find(&node, "INBOX", "t2").expect("delivered"));
    assert!(ar.contains("spf=temperror"), "{ar}");

    let off = start(&dns, "[inbound]\nchecks = false\n");
    let (code, _) = send_message(&off, "x@reject.test", &["alice@example.test"], &mail("reject.test", "r3"));
    assert_eq!(code, 250);
    assert!(!String::from_utf8_lossy(&find(&off, "INBOX", "r3").unwrap()).contains("Authentication-Results"));
}

#[test]
fn a_dns_server_that_never_answers_is_a_tempfail_in_bounded_time() {
    let (_socket, addr) = common::dns::silent_server();
    let node = Node::start(Setup {
        extra: format!("[dns]\nnameservers = [\"{addr}\"]\ntimeout = \"10s\"\n[inbound]\ntimeout = \"1s\"\n"),
        ..Setup::default()
    });
    let started = std::time::Instant::now();
    let (code, text) = send_message(&node, "x@pass.test", &["alice@example.test"], &mail("pass.test", "d1"));
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.7.0"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(node.log().contains("verdict timeout from=<x@pass.test>"), "{}", node.log());
}

/// A message forwarded by one node to another: the forwarder rewrites the envelope sender with
/// SRS, so the next hop's SPF check is about the forwarder's domain and passes, while the
/// original DKIM signature still carries DMARC for the author's strict domain.
#[test]
fn forwarded_mail_with_srs_passes_at_the_next_hop() {
    let public = &key().1;
    let dns = TestDns::start(&format!(
        "{}strict.test TXT \"v=spf1 ip4:192.0.2.1 -all\"\n\
         sel._domainkey.strict.test TXT \"v=DKIM1; k=rsa; p={public}\"\n\
         _dmarc.strict.test TXT \"v=DMARC1; p=reject\"\n\
         forwarder.test TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
         dest.example MX 10 mx.dest.example\nmx.dest.example A 127.0.0.1\n",
        zone()
    ));
    let port = common::pebble::free_port();
    let receiver = Node::start(Setup {
        domains: vec!["dest.example".into()],
        users: vec!["carol@dest.example".into()],
        hostname: "mx.dest.example".into(),
        smtp_listen: format!("127.0.0.1:{port}"),
        extra: format!("[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n", dns.addr()),
        ..Setup::default()
    });
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("srs.secret");
    std::fs::write(&secret, "forwarding-secret\n").unwrap();
    let forwarder = Node::start(Setup {
        domains: vec!["forwarder.test".into()],
        users: vec![],
        hostname: "mx.forwarder.test".into(),
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n[outbound]\nmx_port = {port}\n\
             [srs]\ndomain = \"forwarder.test\"\nsecret_file = {:?}\n\
             [aliases]\n\"fwd@forwarder.test\" = \"carol@dest.example\"\n",
            dns.addr(),
            secret.display().to_string()
        ),
        ..Setup::default()
    });
    let body =
        sign(&mail("strict.test", "srsfwd").replace("To: alice@example.test", "To: fwd@forwarder.test"), "strict.test");
    let (code, text) = send_message(&forwarder, "sender@strict.test", &["fwd@forwarder.test"], &body);
    assert_eq!(code, 250, "the forwarder accepts: DKIM aligns with strict.test though SPF fails: {text}");
    wait_for("the forwarded message", std::time::Duration::from_secs(20), || {
        !inbox(&receiver, "carol@dest.example").is_empty()
    });
    let stored = inbox(&receiver, "carol@dest.example").remove(0);
    let text = String::from_utf8_lossy(&stored).to_string();
    assert!(text.starts_with("Return-Path: <SRS0="), "{text}");
    let ar = auth_results(&stored);
    assert!(ar.starts_with("Authentication-Results: mx.dest.example;"), "{ar}");
    assert!(ar.contains("spf=pass") && ar.contains("smtp.mailfrom=\"SRS0="), "{ar}");
    assert!(ar.contains("@forwarder.test"), "{ar}");
    assert!(ar.contains("dkim=pass") && ar.contains("header.i=@strict.test"), "{ar}");
    assert!(ar.contains("dmarc=pass header.from=strict.test"), "{ar}");
}
