//! The backup MX role (issue 6), as seed 000's failover experiment runs it with OpenSMTPD:
//! a cluster of one primary (MX 10) and one backup (MX 100) plus a third node that sends, each
//! a real `postern` process on its own loopback address, all on one SMTP port, with an
//! in-process DNS server answering for them.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dns::TestDns;
use common::{inbox, wait_for, Dialog, Node};

const PRIMARY_IP: &str = "127.0.0.10";
const BACKUP_IP: &str = "127.0.0.11";
const SENDER_IP: &str = "127.0.0.12";

/// A port free on all three addresses (the kernel gives out ports per address, so check each).
fn shared_port() -> u16 {
    loop {
        let port = common::pebble::free_port();
        let free = [PRIMARY_IP, BACKUP_IP, SENDER_IP]
            .iter()
            .all(|ip| std::net::TcpListener::bind(format!("{ip}:{port}")).is_ok());
        if free {
            return port;
        }
    }
}

fn zone(best: &str) -> String {
    let (primary_pref, backup_pref) = if best == "backup" { (20, 10) } else { (10, 100) };
    format!(
        "example.org MX {primary_pref} mail.example.org\nexample.org MX {backup_pref} mx2.example.org\n\
         mail.example.org A {PRIMARY_IP}\nmx2.example.org A {BACKUP_IP}\n\
         sender.test MX 10 out.sender.test\nout.sender.test A {SENDER_IP}\n"
    )
}

fn write_cert(dir: &Path) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
}

fn hash() -> String {
    postern::auth::hash_password(common::PASSWORD)
}

/// The example.org cluster file: `mail` (primary) and `mx2` (backup). `backup_queue` goes
/// into the backup's `[nodes.mx2.queue]`.
fn cluster_file(dir: &Path, port: u16, dns: &TestDns, backup_queue: &str) -> PathBuf {
    write_cert(dir);
    std::fs::write(dir.join("cluster.key"), "an example cluster secret, shared by both nodes\n").unwrap();
    let text = format!(
        "[cluster]\ndomains = [\"example.org\"]\nsecret_file = \"cluster.key\"\n\n\
         [nodes.mail]\nhostname = \"mail.example.org\"\nrole = \"primary\"\ndata_dir = \"mail-data\"\n\
         listen.smtp = [\"{PRIMARY_IP}:{port}\"]\nlisten.imaps = [\"127.0.0.1:0\"]\nlisten.metrics = [\"127.0.0.1:0\"]\n\n\
         [nodes.mx2]\nhostname = \"mx2.example.org\"\nrole = \"backup\"\ndata_dir = \"mx2-data\"\n\
         listen.smtp = [\"{BACKUP_IP}:{port}\"]\nlisten.metrics = [\"127.0.0.1:0\"]\n\n\
         [nodes.mx2.queue]\nrun_interval = \"1s\"\n{backup_queue}\n\
         [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[outbound]\nmx_port = {port}\n\n\
         [dns]\nnameservers = [\"{}\"]\n\n\
         [users.\"test@example.org\"]\npassword = \"{}\"\n\n[aliases]\n\"postmaster@example.org\" = \"test@example.org\"\n",
        dns.addr(),
        hash()
    );
    let path = dir.join("postern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The sender: another organisation's node, whose alias `fwd@sender.test` forwards to
/// test@example.org through its queue, and whose user `someone@sender.test` gets bounces.
fn sender_file(dir: &Path, port: u16, dns: &TestDns) -> PathBuf {
    write_cert(dir);
    let text = format!(
        "[cluster]\ndomains = [\"sender.test\"]\n\n\
         [nodes.out]\nhostname = \"out.sender.test\"\ndata_dir = \"out-data\"\n\
         listen.smtp = [\"{SENDER_IP}:{port}\"]\nlisten.imaps = [\"127.0.0.1:0\"]\n\n\
         [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[outbound]\nmx_port = {port}\nretry_initial = \"1s\"\n\n\
         [dns]\nnameservers = [\"{}\"]\n\n\
         [users.\"someone@sender.test\"]\npassword = \"{}\"\n\n[aliases]\n\"fwd@sender.test\" = \"test@example.org\"\n",
        dns.addr(),
        hash()
    );
    let path = dir.join("postern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Hands one message to `addr` over SMTP; returns the final reply code.
fn send(addr: &str, from: &str, to: &str, subject: &str) -> u16 {
    let mut d = Dialog::connect(addr.parse().unwrap());
    d.reply();
    d.cmd("EHLO client.test", 250);
    d.cmd(&format!("MAIL FROM:<{from}>"), 250);
    let (code, _) = {
        d.send(&format!("RCPT TO:<{to}>"));
        d.reply()
    };
    if code != 250 {
        return code;
    }
    d.cmd("DATA", 354);
    d.send_raw(
        format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\n{subject}\r\n.\r\n"
        )
        .as_bytes(),
    );
    let (code, _) = d.reply();
    d.send("QUIT");
    code
}

/// Prints every node's log when the test fails (the temporary directories go with it).
struct Logs<'a>(Vec<(&'static str, &'a Node)>);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, node) in &self.0 {
                eprintln!("===== {name} log =====\n{}", node.log());
            }
        }
    }
}

fn subjects(node: &Node, user: &str) -> Vec<String> {
    inbox(node, user)
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(m);
            text.lines().find_map(|l| l.strip_prefix("Subject: ")).unwrap_or("").trim().to_string()
        })
        .collect()
}

fn queue_list(node: &Node) -> String {
    let (ok, out) = node.cli(&["queue", "list"]);
    assert!(ok, "queue list failed: {out}");
    out
}

/// Queue entries listed (lines after the header).
fn queued(node: &Node) -> usize {
    queue_list(node).lines().skip(1).filter(|l| !l.trim().is_empty()).count()
}

fn metrics(node: &Node) -> String {
    let addr = node.addr("metrics");
    let out = std::process::Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output().unwrap();
    assert!(out.status.success(), "curl /metrics failed");
    String::from_utf8(out.stdout).unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Seed 000's experiment: primary up → direct; primary paused → the sender falls back to the
/// backup, which queues; primary resumed → delivered exactly once, within one queue run, with
/// the path in the headers.
#[test]
fn failover_through_the_backup_mx_and_back() {
    let dns = TestDns::start(&zone("primary"));
    let port = shared_port();
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path(), port, &dns, "");
    let sdir = tempfile::tempdir().unwrap();
    let sender_cfg = sender_file(sdir.path(), port, &dns);
    let primary = Node::start_named(&cluster, "mail");
    let backup = Node::start_named(&cluster, "mx2");
    let sender = Node::start_named(&sender_cfg, "out");
    let _logs = Logs(vec![("primary", &primary), ("backup", &backup), ("sender", &sender)]);
    let sender_smtp = format!("{SENDER_IP}:{port}");

    // 1. Primary up: the sender's queue delivers to MX 10.
    assert_eq!(send(&sender_smtp, "someone@sender.test", "fwd@sender.test", "first"), 250);
    wait_for("first message in the INBOX", Duration::from_secs(30), || {
        subjects(&primary, "test@example.org") == ["first"]
    });
    let first = String::from_utf8(inbox(&primary, "test@example.org").remove(0)).unwrap();
    assert!(!first.contains("mx2.example.org"), "went through the backup:\n{first}");

    // 2. Primary paused: the sender tries MX 10 (421), then MX 100, which queues.
    let (ok, out) = primary.cli(&["pause", "smtp"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (code, text) = Dialog::connect(format!("{PRIMARY_IP}:{port}").parse().unwrap()).reply();
    assert_eq!(code, 421, "{text}");
    // Sessions already open go on (as with smtpctl): wait for the sender's pooled one to end.
    wait_for("open sessions to end", Duration::from_secs(20), || {
        metric(&metrics(&primary), "postern_smtp_sessions") == 0
    });
    assert_eq!(send(&sender_smtp, "someone@sender.test", "fwd@sender.test", "second"), 250);
    wait_for("the backup to hold the message", Duration::from_secs(30), || queued(&backup) == 1);
    wait_for("the sender's queue to empty", Duration::from_secs(30), || queued(&sender) == 0);
    let list = queue_list(&backup);
    assert!(list.contains("test@example.org") && list.contains("someone@sender.test"), "{list}");
    // The backup tried the primary (and got its 421) and is waiting.
    wait_for("a failed relay attempt", Duration::from_secs(30), || queue_list(&backup).contains("421"));
    assert_eq!(subjects(&primary, "test@example.org"), ["first"]);
    let before = metrics(&backup);
    assert!(metric(&before, "postern_delivery_total{result=\"tmpfail\"}") >= 1, "{before}");
    assert_eq!(metric(&before, "postern_queue_messages"), 1);
    assert_eq!(metric(&before, "postern_queue_envelopes"), 1);

    // `postern monitor` prints smtpctl's header and lines of 13 counters.
    let (ok, out) = backup.cli(&["monitor", "--count", "2"]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("client") && lines[1].starts_with("curr conn disc curr enq deq ok"), "{out}");
    assert_eq!(lines.len(), 4, "{out}");
    for l in &lines[2..] {
        assert_eq!(l.split_whitespace().filter(|w| w.parse::<u64>().is_ok()).count(), 13, "{l}");
    }

    // 3. Primary resumed: within a queue run (1s here), not after the backoff (1 minute).
    let (ok, out) = primary.cli(&["resume", "smtp"]);
    assert!(ok && out.contains("resumed"), "{out}");
    wait_for("the held message at the primary", Duration::from_secs(20), || {
        subjects(&primary, "test@example.org").len() == 2
    });
    assert_eq!(subjects(&primary, "test@example.org"), ["first", "second"]);
    assert_eq!(queued(&backup), 0);
    let second = String::from_utf8(inbox(&primary, "test@example.org").remove(1)).unwrap();
    // The trail: the primary took it from the backup over an authenticated hop, the backup
    // from the sender's node.
    let received: Vec<&str> = second.lines().filter(|l| l.starts_with("Received:")).collect();
    assert!(received.len() >= 2, "{second}");
    assert!(second.contains("by mail.example.org") && second.contains("by mx2.example.org"), "{second}");
    assert!(received[0].contains("mx2.example.org") && second.contains("ESMTPSA"), "{second}");
    assert!(primary.log().contains("cluster-auth node=mx2") && primary.log().contains("result=ok"));
    // The border checks ran once, at the backup; the primary kept its verdict and added none.
    // (The sender's node wrote one too, for its own inbound hop.)
    let verdicts: Vec<&str> = second.lines().filter(|l| l.starts_with("Authentication-Results:")).collect();
    assert!(verdicts.iter().any(|v| v.contains("mx2.example.org")), "{second}");
    assert!(!verdicts.iter().any(|v| v.contains("mail.example.org")), "{second}");
    assert!(primary.log().contains("verdict skipped: relayed by cluster node mx2"), "{}", primary.log());
    assert!(first.contains("Authentication-Results: mail.example.org"), "{first}");
    let after = metrics(&backup);
    assert!(metric(&after, "postern_delivery_total{result=\"ok\"}") >= 1, "{after}");
    assert_eq!(metric(&after, "postern_queue_messages"), 0);
}

/// The backup refuses what it could not deliver (no backscatter), keeps what it accepted across
/// a restart and a kill -9, and delivers it all once the primary is back.
#[test]
fn the_backup_refuses_strangers_and_loses_nothing() {
    let dns = TestDns::start(&zone("primary"));
    let port = shared_port();
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path(), port, &dns, "");
    let mut backup = Node::start_named(&cluster, "mx2");
    let backup_smtp = format!("{BACKUP_IP}:{port}");

    // Unknown user and foreign domain: refused at RCPT, as a primary would.
    let mut d = Dialog::connect(backup_smtp.parse().unwrap());
    d.reply();
    d.cmd("EHLO client.test", 250);
    d.cmd("MAIL FROM:<someone@sender.test>", 250);
    let r = d.cmd("RCPT TO:<nobody@example.org>", 550);
    assert!(r.contains("5.1.1"), "{r}");
    let r = d.cmd("RCPT TO:<someone@elsewhere.test>", 550);
    assert!(r.contains("5.7.1"), "{r}");
    // An alias is a known recipient; so is a subaddress.
    d.cmd("RCPT TO:<postmaster@example.org>", 250);
    d.cmd("RCPT TO:<test+tag@example.org>", 250);
    d.cmd("RSET", 250);
    // Port 25 AUTH with a made-up cluster proof fails (and needs TLS first).
    d.cmd("AUTH X-POSTERN-CLUSTER bWFpbCAwMA==", 530);
    d.send("QUIT");
    // Over TLS (Python's smtplib): offered only then, and a wrong proof gets 535.
    let script = format!(
        "import smtplib, ssl\ns = smtplib.SMTP('{BACKUP_IP}', {port}, timeout=20)\ns.ehlo('client.test')\n\
         before = s.has_extn('auth')\nc = ssl.create_default_context()\nc.check_hostname = False\n\
         c.verify_mode = ssl.CERT_NONE\ns.starttls(context=c)\ns.ehlo('client.test')\n\
         print(before, s.esmtp_features.get('auth', '').strip())\n\
         print(s.docmd('AUTH', 'X-POSTERN-CLUSTER bWFpbCAwMDAw')[0])\n\
         print(s.docmd('AUTH', 'PLAIN AHRlc3RAZXhhbXBsZS5vcmcAeA==')[0])\ns.quit()\n"
    );
    let out = std::process::Command::new("python3").arg("-c").arg(&script).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["False X-POSTERN-CLUSTER", "535", "504"], "{out}");

    // The primary is down: three messages wait at the backup.
    for i in 0..3 {
        assert_eq!(send(&backup_smtp, "someone@sender.test", "test@example.org", &format!("held-{i}")), 250);
    }
    // A verdict forged in the name of a node of ours is dropped at the border (RFC 8601 §5).
    let mut d = Dialog::connect(backup_smtp.parse().unwrap());
    d.reply();
    d.cmd("EHLO client.test", 250);
    d.cmd("MAIL FROM:<someone@sender.test>", 250);
    d.cmd("RCPT TO:<test@example.org>", 250);
    d.cmd("DATA", 354);
    d.send_raw(
        b"Authentication-Results: mail.example.org; spf=pass; dmarc=pass\r\nSubject: held-3\r\n\r\nforged\r\n.\r\n",
    );
    assert_eq!(d.reply().0, 250);
    d.send("QUIT");
    wait_for("four queued", Duration::from_secs(10), || queued(&backup) == 4);
    backup.stop();
    backup.launch();
    assert_eq!(queued(&backup), 4, "lost on restart");
    backup.kill9();
    backup.launch();
    assert_eq!(queued(&backup), 4, "lost on kill -9");

    let primary = Node::start_named(&cluster, "mail");
    wait_for("all four at the primary", Duration::from_secs(30), || subjects(&primary, "test@example.org").len() == 4);
    let mut got = subjects(&primary, "test@example.org");
    got.sort();
    assert_eq!(got, ["held-0", "held-1", "held-2", "held-3"]);
    for m in inbox(&primary, "test@example.org") {
        let m = String::from_utf8_lossy(&m).to_string();
        assert!(!m.contains("mail.example.org; spf=pass"), "forged verdict kept:\n{m}");
    }
    wait_for("the backup's queue to empty", Duration::from_secs(10), || queued(&backup) == 0);
}

/// DNS names the backup as the best MX: relaying would loop. The mail stays queued (no bounce)
/// and `queue list` says why; after the lifetime it bounces to the original sender.
#[test]
fn a_backup_listed_as_best_mx_holds_mail_then_bounces_after_the_lifetime() {
    let dns = TestDns::start(&zone("backup"));
    let port = shared_port();
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path(), port, &dns, "lifetime = \"8s\"\n");
    let sdir = tempfile::tempdir().unwrap();
    let sender = Node::start_named(&sender_file(sdir.path(), port, &dns), "out");
    let primary = Node::start_named(&cluster, "mail");
    let backup = Node::start_named(&cluster, "mx2");
    let _logs = Logs(vec![("primary", &primary), ("backup", &backup), ("sender", &sender)]);

    let backup_smtp = format!("{BACKUP_IP}:{port}");
    assert_eq!(send(&backup_smtp, "someone@sender.test", "test@example.org", "looping"), 250);
    wait_for("the loop reason in queue list", Duration::from_secs(10), || queue_list(&backup).contains("loops back"));
    assert!(backup.log().contains("refusing to relay"), "{}", backup.log());
    assert_eq!(queued(&backup), 1);
    assert!(subjects(&sender, "someone@sender.test").is_empty(), "bounced before the lifetime");
    assert!(subjects(&primary, "test@example.org").is_empty());
    assert!(metric(&metrics(&backup), "postern_delivery_total{result=\"loop\"}") >= 1);

    // The lifetime (8s here, four weeks by default) ends: a DSN to the original sender.
    wait_for("the DSN at the sender", Duration::from_secs(30), || !subjects(&sender, "someone@sender.test").is_empty());
    let dsn = String::from_utf8(inbox(&sender, "someone@sender.test").remove(0)).unwrap();
    assert!(dsn.contains("multipart/report") && dsn.contains("Action: failed"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; test@example.org"), "{dsn}");
    assert!(dsn.contains("loops back"), "{dsn}");
    wait_for("the backup's queue to empty", Duration::from_secs(10), || queued(&backup) == 0);
}

/// Only a node holding the secret may skip the border checks; the config refuses a backup
/// without one, and a backup with mailbox listeners.
#[test]
fn cluster_config_rules() {
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start("");
    let port = shared_port();
    let cluster = cluster_file(dir.path(), port, &dns, "");
    let text = std::fs::read_to_string(&cluster).unwrap();
    let check = |text: &str| {
        let path = dir.path().join("variant.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["check-config", "--node", "mx2", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = check(&text);
    assert!(ok, "{out}");
    let (ok, out) = check(&text.replace("secret_file = \"cluster.key\"\n", ""));
    assert!(!ok && out.contains("cluster.secret_file") && out.contains("backup node"), "{out}");
    let (ok, out) = check(&text.replace(
        "listen.metrics = [\"127.0.0.1:0\"]",
        "listen.metrics = [\"127.0.0.1:0\"]\nlisten.imap = [\"127.0.0.1:0\"]",
    ));
    assert!(!ok && out.contains("nodes.mx2.listen") && out.contains("listen.imap"), "{out}");
    std::fs::write(dir.path().join("cluster.key"), "short\n").unwrap();
    let (ok, out) = check(&text);
    assert!(!ok && out.contains("at least 16"), "{out}");
}
