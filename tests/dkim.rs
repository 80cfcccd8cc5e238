//! DKIM signing end to end: `postern dkim keygen` writes keys, `[[dkim]]` loads them, mail
//! submitted on 587 (and bounces the queue writes) leaves signed, and dkimpy and OpenDKIM — with
//! the public keys `postern dns-records` prints, served by the test DNS — accept the signatures.

mod common;
#[path = "common/opendkim.rs"]
mod opendkim;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::dns::TestDns;
use common::pebble::free_port;
use common::*;
use opendkim::{dns_records, keygen as keygen_ok, keygen_output as keygen};

const LISTEN: &str = "listen.submission = [\"127.0.0.1:0\"]\n";

/// Standard zone lines (`NAME. TTL IN TYPE DATA`) → the test DNS's `NAME TYPE DATA`; comments dropped.
fn zone_for_test_dns(zone: &str) -> String {
    let mut out = String::new();
    for line in zone.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let mut parts = line.splitn(5, char::is_whitespace);
        let (name, ttl, class, rtype, rest) =
            (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap(), parts.next());
        assert!(ttl.parse::<u32>().is_ok() && class == "IN", "not a zone line: {line}");
        out.push_str(&format!("{name} {rtype} {}\n", rest.unwrap_or("")));
    }
    out
}

/// The TXT value of `name` in test-DNS zone text (quoted pieces concatenated).
fn txt_of(zone: &str, name: &str) -> String {
    let line = zone
        .lines()
        .find(|l| l.split_whitespace().next().map(|n| n.trim_end_matches('.')) == Some(name) && l.contains(" TXT "))
        .unwrap_or_else(|| panic!("no TXT record for {name} in\n{zone}"));
    line.split('"').skip(1).step_by(2).collect()
}

/// Verifies every DKIM-Signature of `msg` with dkimpy (the system's python3-dkim), the keys
/// looked up in `zone` (test-DNS syntax). Returns one "True"/"False" per signature.
fn dkimpy_verify(msg: &[u8], zone: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mpath = dir.path().join("msg.eml");
    std::fs::write(&mpath, msg).unwrap();
    let zpath = dir.path().join("zone.txt");
    std::fs::write(&zpath, zone).unwrap();
    let script = format!(
        "import dkim, sys\n\
         zone = {{}}\n\
         for line in open({zpath:?}):\n\
         \x20   p = line.split(None, 2)\n\
         \x20   if len(p) == 3 and p[1] == 'TXT':\n\
         \x20       zone[p[0].rstrip('.').lower()] = ''.join(p[2].split('\"')[1::2]).encode()\n\
         def dnsfunc(name, timeout=5):\n\
         \x20   return zone.get(name.decode().rstrip('.').lower())\n\
         msg = open({mpath:?}, 'rb').read()\n\
         d = dkim.DKIM(msg)\n\
         n = len([h for h in d.headers if h[0].lower() == b'dkim-signature'])\n\
         for i in range(n):\n\
         \x20   try:\n\
         \x20       print(d.verify(idx=i, dnsfunc=dnsfunc))\n\
         \x20   except dkim.ValidationError:\n\
         \x20       print(False)\n"
    );
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "dkimpy: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

fn header_fields(msg: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("").replace("\r\n\t", " ").replace("\r\n ", " ");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.lines().filter(|l| l.to_ascii_lowercase().starts_with(&prefix)).map(str::to_string).collect()
}

fn tag<'a>(field: &'a str, name: &str) -> Option<&'a str> {
    let value = field.split_once(':')?.1;
    value.split(';').map(str::trim).find_map(|t| t.strip_prefix(&format!("{name}=")))
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let k = key.to_str().unwrap();
    let out = keygen_ok(&["example.test", "--selector", "sel1", "--out", k]);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    assert!(out.contains("sel1._domainkey.example.test. 3600 IN TXT \"v=DKIM1; k=ed25519; p="), "{out}");
    assert!(out.contains("[[dkim]]\ndomain = \"example.test\"\nselector = \"sel1\"\nalgorithm = \"ed25519\""), "{out}");
    let again = keygen(&["example.test", "--selector", "sel1", "--out", k]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), pem, "the key is untouched");
    // RSA: a record over 255 bytes comes as several strings, none longer than 255.
    let rsa = dir.path().join("r.key");
    let out = keygen_ok(&["example.test", "-s", "sel2", "--algorithm", "rsa", "--out", rsa.to_str().unwrap()]);
    let line = out.lines().find(|l| l.contains(" IN TXT ")).unwrap();
    let pieces: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    assert!(pieces.len() >= 2 && pieces.iter().all(|p| p.len() <= 255), "{line}");
    assert!(pieces.concat().starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"), "{line}");
}

struct Signed {
    tx: Node,
    rx: Node,
    zone: String,
    _dns: TestDns,
    _keys: tempfile::TempDir,
}

/// A sending node for example.test with ed25519 + rsa keys for example.test and an ed25519
/// key for `*.example.test`, delivering dest.example by MX to a second node; the test DNS
/// serves what `postern dns-records` printed for it.
fn signed_setup() -> Signed {
    let keys = tempfile::tempdir().unwrap();
    let ed = keys.path().join("ed.key");
    let rsa = keys.path().join("rsa.key");
    let sub = keys.path().join("sub.key");
    keygen_ok(&["example.test", "-s", "ed1", "--out", ed.to_str().unwrap()]);
    keygen_ok(&["example.test", "-s", "rsa1", "-a", "rsa", "--out", rsa.to_str().unwrap()]);
    keygen_ok(&["example.test", "-s", "sub1", "--out", sub.to_str().unwrap()]);
    let dns = TestDns::start("");
    let port = free_port();
    let rx = Node::start(Setup {
        domains: vec!["dest.example".into()],
        users: vec!["carol@dest.example".into()],
        hostname: "mx.dest.example".into(),
        smtp_listen: format!("127.0.0.1:{port}"),
        ..Setup::default()
    });
    let tx = Node::start(Setup {
        domains: vec!["example.test".into(), "example.net".into()],
        users: vec!["alice@example.test".into(), "bob@example.test".into()],
        node_extra: LISTEN.into(),
        extra: format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n\
             [outbound]\nmx_port = {port}\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\n\
             [[dkim]]\ndomain = \"example.test\"\nselector = \"ed1\"\nalgorithm = \"ed25519\"\nkey = {:?}\n\n\
             [[dkim]]\ndomain = \"example.test\"\nselector = \"rsa1\"\nalgorithm = \"rsa-sha256\"\nkey = {:?}\n\n\
             [[dkim]]\ndomain = \"*.example.test\"\nselector = \"sub1\"\nalgorithm = \"ed25519\"\nkey = {:?}\n",
            dns.addr(),
            ed.display().to_string(),
            rsa.display().to_string(),
            sub.display().to_string()
        ),
        ..Setup::default()
    });
    let records = dns_records(&tx.config);
    let mut zone = zone_for_test_dns(&records);
    zone.push_str("dest.example MX 10 mx.dest.example\nmx.dest.example A 127.0.0.1\nnomail.example MX 0 .\n");
    dns.set_zone(&zone);
    Signed { tx, rx, zone, _dns: dns, _keys: keys }
}

fn check_signatures(msg: &[u8], zone: &str, selectors: &[&str]) {
    let text = String::from_utf8_lossy(msg);
    let sigs = header_fields(msg, "DKIM-Signature");
    assert_eq!(sigs.len(), selectors.len(), "{text}");
    for (sig, selector) in sigs.iter().zip(selectors) {
        assert_eq!(tag(sig, "s"), Some(*selector), "{sig}");
        assert_eq!(tag(sig, "d"), Some("example.test"), "{sig}");
        assert_eq!(tag(sig, "c"), Some("relaxed/relaxed"), "{sig}");
        assert_eq!(tag(sig, "l"), None, "{sig}");
        let h: String = tag(sig, "h").unwrap().split_whitespace().collect();
        let h: Vec<String> = h.split(':').map(str::to_ascii_lowercase).collect();
        assert_eq!(h.iter().filter(|n| *n == "from").count(), 2, "From over-signed: {sig}");
        assert!(!h.iter().any(|n| n == "return-path" || n == "received"), "{sig}");
    }
    let verdicts = dkimpy_verify(msg, zone);
    assert_eq!(verdicts, vec!["True"; selectors.len()], "dkimpy on\n{text}");
}

#[test]
fn submitted_mail_is_signed_with_each_key_and_verifies() {
    let s = signed_setup();
    // The records tie keygen, config and signing together.
    assert!(s.zone.contains("ed1._domainkey.example.test. TXT \"v=DKIM1; k=ed25519; p="), "{}", s.zone);
    assert!(s.zone.contains("example.test. MX 10 mx.example.test."), "{}", s.zone);
    assert!(s.zone.contains("_dmarc.example.test. TXT \"v=DMARC1; p=quarantine"), "{}", s.zone);
    assert!(txt_of(&s.zone, "rsa1._domainkey.example.test").starts_with("v=DKIM1; k=rsa; p="));
    let body = "From: Alice <alice@example.test>\r\nTo: bob@example.test, carol@dest.example\r\n\
                Subject: signed  \r\n\tfolded\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <dkim1@example.test>\r\n\
                MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello   Bob,  \r\n\r\n\r\n";
    submit(&s.tx, "alice@example.test", &["bob@example.test", "carol@dest.example"], body);
    let local = inbox(&s.tx, "bob@example.test");
    assert_eq!(local.len(), 1);
    check_signatures(&local[0], &s.zone, &["ed1", "rsa1"]);
    wait_for("delivery to the second node", Duration::from_secs(20), || inbox(&s.rx, "carol@dest.example").len() == 1);
    let remote = &inbox(&s.rx, "carol@dest.example")[0];
    check_signatures(remote, &s.zone, &["ed1", "rsa1"]);
    // A changed body fails: the verifier is really checking.
    let mut tampered = remote.clone();
    let n = tampered.len();
    tampered.splice(n - 4..n - 4, b"x".iter().copied());
    assert_eq!(dkimpy_verify(&tampered, &s.zone), vec!["False", "False"]);
    // OpenDKIM too, asking a dnsmasq that serves the keys (see opendkim_verify).
    let result = opendkim_verify(remote, &s.zone).expect("opendkim-testmsg could not be run (dnsmasq, unshare)");
    assert!(result, "opendkim-testmsg rejected the signatures");
}

#[test]
fn bounces_are_signed_with_the_hostname_domain_key() {
    let s = signed_setup();
    let body = "From: alice@example.test\r\nTo: x@nomail.example\r\nSubject: undeliverable\r\n\r\nHi\r\n";
    submit(&s.tx, "alice@example.test", &["x@nomail.example"], body);
    wait_for("the bounce", Duration::from_secs(20), || inbox(&s.tx, "alice@example.test").len() == 1);
    let bounce = &inbox(&s.tx, "alice@example.test")[0];
    let text = String::from_utf8_lossy(bounce);
    assert!(
        text.contains("From: MAILER-DAEMON@mx.example.test") || text.contains("<MAILER-DAEMON@mx.example.test>"),
        "{text}"
    );
    // mx.example.test is covered by the `*.example.test` entry: d=example.test, selector sub1.
    let sigs = header_fields(bounce, "DKIM-Signature");
    assert_eq!(sigs.len(), 1, "{text}");
    assert_eq!(tag(&sigs[0], "s"), Some("sub1"));
    assert_eq!(dkimpy_verify(bounce, &s.zone), vec!["True"], "{text}");
}

#[test]
fn mail_from_a_domain_without_a_key_is_not_signed() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("net.key");
    keygen_ok(&["example.net", "-s", "n1", "--out", key.to_str().unwrap()]);
    let tx = Node::start(Setup {
        node_extra: LISTEN.into(),
        extra: format!(
            "[outbound]\nrelay = \"smtp://127.0.0.1:9\"\n\n[[dkim]]\ndomain = \"example.net\"\nselector = \"n1\"\n\
             algorithm = \"ed25519\"\nkey = {:?}\n",
            key.display().to_string()
        ),
        ..Setup::default()
    });
    let body = "From: alice@example.test\r\nTo: bob@example.test\r\nSubject: plain\r\n\r\nHi\r\n";
    submit(&tx, "alice@example.test", &["bob@example.test"], body);
    let got = inbox(&tx, "bob@example.test");
    assert_eq!(got.len(), 1);
    assert!(header_fields(&got[0], "DKIM-Signature").is_empty(), "{}", String::from_utf8_lossy(&got[0]));
}

#[test]
fn config_errors_name_the_dkim_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.toml");
    let base = "[cluster]\ndomains = [\"example.test\"]\n[nodes.a]\nhostname = \"mx.example.test\"\n\n";
    std::fs::write(
        &path,
        format!("{base}[[dkim]]\ndomain = \"example.test\"\nselector = \"s\"\nalgorithm = \"ed25519\"\nkey = \"missing.key\"\n"),
    )
    .unwrap();
    let out = Command::new(bin()).arg("check-config").arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(":10: dkim[0].key") && err.contains("cannot read the DKIM key"), "{err}");
}

/// Runs `opendkim-testmsg` on `msg` with the keys of `zone` served on 127.0.0.153:53 by dnsmasq,
/// inside a mount namespace whose /etc/resolv.conf points there. `None` when that cannot be
/// arranged here (no root, no unshare, no dnsmasq, or port 53 taken).
fn opendkim_verify(msg: &[u8], zone: &str) -> Option<bool> {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.153\n").unwrap();
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        "--listen-address=127.0.0.153".into(),
        "--port=53".into(),
    ];
    for line in zone.lines() {
        let p: Vec<&str> = line.splitn(3, ' ').collect();
        if p.len() == 3 && p[1] == "TXT" && p[0].contains("._domainkey.") {
            let value: String = p[2].split('"').skip(1).step_by(2).collect();
            let pieces: Vec<String> =
                value.as_bytes().chunks(255).map(|c| String::from_utf8_lossy(c).to_string()).collect();
            args.push(format!("--txt-record={},{}", p[0].trim_end_matches('.'), pieces.join(",")));
        }
    }
    let mut dnsmasq = Command::new("dnsmasq").args(&args).stderr(std::process::Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(300));
    if dnsmasq.try_wait().ok().flatten().is_some() {
        return None;
    }
    let mpath = dir.path().join("msg.eml");
    std::fs::write(&mpath, msg).unwrap();
    let script =
        format!("mount --bind {} /etc/resolv.conf && exec opendkim-testmsg < {}", resolv.display(), mpath.display());
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output();
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let out = out.ok()?;
    match out.status.code() {
        Some(0) => Some(true),
        Some(70) => {
            eprintln!("opendkim-testmsg: {}", String::from_utf8_lossy(&out.stderr));
            Some(false)
        }
        _ => {
            eprintln!("opendkim-testmsg could not run: {}", String::from_utf8_lossy(&out.stderr));
            None
        }
    }
}
