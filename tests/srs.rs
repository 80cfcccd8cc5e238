//! SRS end to end: forwards leave with an SRS0 MAIL FROM, bounces to SRS addresses go back to
//! the original sender, forged and expired addresses are refused at RCPT; and compatibility
//! with postsrsd (the Debian package) for the same secret, day and address.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::dns::TestDns;
use common::pebble::free_port;
use common::sink::Sink;
use common::*;
use postern::routing::srs::{forward_at, reverse_at, today};

const ZONE: &str = "dest.example MX 10 mx.dest.example\npeer.test MX 10 mx.dest.example\n\
                    mx.dest.example A 127.0.0.1\n";
const SRS_DOMAIN: &str = "fwd.example.test";

/// example.test forwards `fwd@` to carol@dest.example; SRS addresses live in fwd.example.test.
/// The secret file's first line signs, the second only verifies.
fn node(dns: &TestDns, mx_port: u16, secret_file: &std::path::Path) -> Node {
    Node::start(Setup {
        domains: vec!["example.test".into(), SRS_DOMAIN.into()],
        users: vec!["alice@example.test".into()],
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n\
             [outbound]\nmx_port = {mx_port}\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [srs]\ndomain = \"{SRS_DOMAIN}\"\nsecret_file = {:?}\n\
             [aliases]\n\"fwd@example.test\" = \"carol@dest.example\"\n",
            dns.addr(),
            secret_file.display().to_string()
        ),
        ..Setup::default()
    })
}

fn dumps(sink: &Sink) -> Vec<String> {
    sink.dumps().iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
}

fn wait_dump(sink: &Sink, what: &str, needle: &str) -> String {
    let mut found = String::new();
    wait_for(what, Duration::from_secs(20), || {
        found = dumps(sink).into_iter().find(|d| d.contains(needle)).unwrap_or_default();
        !found.is_empty()
    });
    found
}

fn rcpt(node: &Node, from: &str, to: &str) -> (u16, String) {
    let mut d = smtp(node);
    d.cmd(&format!("MAIL FROM:<{from}>"), 250);
    d.send(&format!("RCPT TO:<{to}>"));
    let r = d.reply();
    d.send("QUIT");
    r
}

#[test]
fn forwards_are_rewritten_and_bounces_come_back() {
    let dns = TestDns::start(ZONE);
    let port = free_port();
    let sink = Sink::start_at(port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("srs.secret");
    std::fs::write(&secret, "first-secret\nsecond-secret\n").unwrap();
    let mut tx = node(&dns, port, &secret);

    // A plain outside sender: SRS0 in the SRS domain, as computed by the pure function.
    let (code, _) =
        send_message(&tx, "sender@peer.test", &["fwd@example.test"], &message("srs-plain", "fwd@example.test"));
    assert_eq!(code, 250);
    let dump = wait_dump(&sink, "the forward", "srs-plain");
    let day = today();
    let srs0 = forward_at(b"first-secret", SRS_DOMAIN, "sender@peer.test", day).unwrap();
    assert!(srs0.starts_with("SRS0=") && srs0.ends_with("=peer.test=sender@fwd.example.test"), "{srs0}");
    assert!(dump.contains(&format!("<{srs0}>")) || day != today(), "{dump}");

    // Our own domain's sender and the null sender are not rewritten.
    send_message(&tx, "alice@example.test", &["fwd@example.test"], &message("srs-own", "fwd@example.test"));
    let dump = wait_dump(&sink, "the own-domain forward", "srs-own");
    assert!(dump.contains("<alice@example.test>") && !dump.contains("SRS0="), "{dump}");
    send_message(&tx, "", &["fwd@example.test"], &message("srs-null", "fwd@example.test"));
    let dump = wait_dump(&sink, "the null-sender forward", "srs-null");
    assert!(!dump.contains("SRS0="), "{dump}");

    // A bounce to the SRS0 address: accepted and queued to the original sender.
    let (code, _) = send_message(&tx, "", &[&srs0], &message("srs-bounce", &srs0));
    assert_eq!(code, 250);
    let dump = wait_dump(&sink, "the bounce to the original sender", "srs-bounce");
    assert!(dump.contains("<sender@peer.test>"), "{dump}");
    // Hash case smashed by a remote MTA still verifies.
    let (code, _) = rcpt(&tx, "", &srs0.to_lowercase());
    assert_eq!(code, 250);

    // Key rotation: an address signed with the second secret verifies.
    let old = forward_at(b"second-secret", SRS_DOMAIN, "x@peer.test", today()).unwrap();
    assert_eq!(rcpt(&tx, "", &old).0, 250);

    // Forged hash, expired timestamp, unknown secret: 550 5.7.1 at RCPT.
    let hash = &srs0[5..9];
    let forged = srs0.replacen(hash, if hash == "AAAA" { "BBBB" } else { "AAAA" }, 1);
    let (code, text) = rcpt(&tx, "", &forged);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1") && text.contains("invalid hash"), "{text}");
    let expired = forward_at(b"first-secret", SRS_DOMAIN, "sender@peer.test", today() - 30).unwrap();
    let (code, text) = rcpt(&tx, "", &expired);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1") && text.contains("expired"), "{text}");
    let stranger = forward_at(b"not-ours", SRS_DOMAIN, "sender@peer.test", today()).unwrap();
    assert_eq!(rcpt(&tx, "", &stranger).0, 550);
    assert!(tx.log().contains("reason=srs"));
    tx.stop();
}

/// postsrsd on two free ports (forward, reverse) with a secret file; killed on drop.
struct Postsrsd {
    child: Child,
    forward: u16,
    reverse: u16,
    _dir: tempfile::TempDir,
}

impl Postsrsd {
    fn start(secrets: &str, domain: &str) -> Postsrsd {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, secrets).unwrap();
        let (forward, reverse) = (free_port(), free_port());
        let child = Command::new("/usr/sbin/postsrsd")
            .arg(format!("-s{}", file.display()))
            .arg(format!("-d{domain}"))
            .args(["-l127.0.0.1", &format!("-f{forward}"), &format!("-r{reverse}"), "-4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postsrsd (Debian package postsrsd)");
        let p = Postsrsd { child, forward, reverse, _dir: dir };
        wait_for("postsrsd", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", p.forward)).is_ok() && TcpStream::connect(("127.0.0.1", p.reverse)).is_ok()
        });
        p
    }

    /// Postfix tcp_table: `get <url-encoded>` → `200 <url-encoded>` or `500 <reason>`.
    fn get(&self, port: u16, address: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let encoded: String = address
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"@.-_".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        writeln!(s, "get {encoded}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let line = line.trim_end();
        match line.split_once(' ') {
            Some(("200", v)) => Ok(percent_decode(v)),
            _ => Err(line.to_string()),
        }
    }
}

impl Drop for Postsrsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn same_output_as_postsrsd() {
    let domain = "srs.example.test";
    let p = Postsrsd::start("tops3cr3t\nold-secret\n", domain);
    let secrets = vec![b"tops3cr3t".to_vec(), b"old-secret".to_vec()];
    let senders = [
        "test@otherdomain.com",
        "hash234@somedomain.com",
        "First.Last+tag@Mixed.Example",
        "SRS0=opaque+string@otherdomain.com",
        "SRS1=X=thirddomain.com==opaque+string@otherdomain.com",
        "SRS0=1Yqg=2W=hosta.com=usera@hostb.com",
    ];
    for sender in senders {
        // SRS timestamps are per day: retry if a day boundary falls between the two.
        let (ours, theirs) = loop {
            let day = today();
            let theirs = p.get(p.forward, sender).unwrap();
            let ours = forward_at(b"tops3cr3t", domain, sender, day).unwrap();
            if day == today() {
                break (ours, theirs);
            }
        };
        assert_eq!(ours, theirs, "forward of {sender}");
        // postsrsd reverses ours, and we reverse postsrsd's.
        assert_eq!(p.get(p.reverse, &ours).unwrap(), expected_reverse(sender, domain), "postsrsd reverse of {ours}");
        assert_eq!(reverse_at(&secrets, &theirs, today(), 21).unwrap(), expected_reverse(sender, domain));
    }
    // Rotation on both sides: signed with the second secret.
    let old = forward_at(b"old-secret", domain, "x@y.example", today()).unwrap();
    assert_eq!(p.get(p.reverse, &old).unwrap(), "x@y.example");
    // Both refuse a forged hash and an expired timestamp.
    let expired = forward_at(b"tops3cr3t", domain, "x@y.example", today() - 30).unwrap();
    assert!(p.get(p.reverse, &expired).is_err());
    assert!(reverse_at(&secrets, &expired, today(), 21).is_err());
    let forged = format!("SRS0=FAKE={}", &old[10..]);
    assert!(p.get(p.reverse, &forged).is_err());
    assert!(reverse_at(&secrets, &forged, today(), 21).is_err());
}

/// SRS0 reverses to the sender; SRS1 (of an SRS0 or SRS1 sender) to the first forwarder's SRS0.
fn expected_reverse(sender: &str, _domain: &str) -> String {
    let (user, host) = sender.rsplit_once('@').unwrap();
    if let Some(rest) = user.strip_prefix("SRS0") {
        format!("SRS0{rest}@{host}")
    } else if let Some(rest) = user.strip_prefix("SRS1=") {
        let (_, after) = rest.split_once('=').unwrap();
        let (fwd1, opaque) = after.split_once('=').unwrap();
        format!("SRS0{opaque}@{fwd1}")
    } else {
        sender.to_string()
    }
}
