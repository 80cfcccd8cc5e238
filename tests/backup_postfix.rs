//! The backup MX role (issue 6) with a real peer: Postfix is the sending MTA and picks between
//! our primary (MX 10) and our backup (MX 100) by MX preference, as any MTA on the Internet would.
//!
//! Postfix only uses the system resolver, so a dnsmasq on a loopback address serves the
//! example.org MX and A records, and Postfix runs in its own mount namespace whose
//! /etc/resolv.conf names that dnsmasq. The Postern nodes get the same records from the
//! in-process test DNS. Both nodes listen on one port (each on its own loopback address), and
//! Postfix's `relayhost = example.org:PORT` makes it look up the MX hosts and use that port.

mod common;
#[path = "common/postfix.rs"]
mod postfix;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::{inbox, message, Node};
use postfix::{Postfix, Role};

const PRIMARY_IP: &str = "127.0.0.10";
const BACKUP_IP: &str = "127.0.0.11";
const USER: &str = "test@example.org";
const SENDER: &str = "sender@peer.test";

/// A port free on both node addresses.
fn shared_port() -> u16 {
    loop {
        let port = common::pebble::free_port();
        if [PRIMARY_IP, BACKUP_IP].iter().all(|ip| std::net::TcpListener::bind(format!("{ip}:{port}")).is_ok()) {
            return port;
        }
    }
}

/// Why this test cannot run here (not root, or no unshare/dnsmasq), if so.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (Postfix, dnsmasq on port 53 and unshare -m need it)".into());
    }
    for tool in ["unshare", "dnsmasq"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// A dnsmasq answering for example.org on port 53 of a loopback address, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Dnsmasq {
    /// Tries a few loopback addresses (other tests use 127.0.0.153) until one is free.
    fn start(dir: &Path) -> Dnsmasq {
        let mut failures = String::new();
        for addr in ["127.0.0.154", "127.0.0.155", "127.0.0.156", "127.0.0.157"] {
            let log = dir.join(format!("dnsmasq-{addr}.log"));
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--port=53",
                    "--log-queries",
                    "--log-facility=-",
                ])
                .arg(format!("--listen-address={addr}"))
                .arg(format!("--pid-file={}", dir.join(format!("dnsmasq-{addr}.pid")).display()))
                .arg("--mx-host=example.org,mail.example.org,10")
                .arg("--mx-host=example.org,mx2.example.org,100")
                .arg(format!("--host-record=mail.example.org,{PRIMARY_IP}"))
                .arg(format!("--host-record=mx2.example.org,{BACKUP_IP}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("run dnsmasq");
            let mut d = Dnsmasq { child, addr: addr.to_string(), log };
            std::thread::sleep(Duration::from_millis(300));
            if d.child.try_wait().unwrap().is_none() {
                return d;
            }
            failures.push_str(&format!("{addr}: {}\n", d.log()));
        }
        panic!("dnsmasq could not start on any address:\n{failures}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster file: `mail` (primary, MX 10) and `mx2` (backup, MX 100) on `port`.
fn cluster_file(dir: &Path, port: u16, dns: &TestDns) -> PathBuf {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.join("cluster.key"), "the secret of the example.org cluster\n").unwrap();
    let text = format!(
        "[cluster]\ndomains = [\"example.org\"]\nsecret_file = \"cluster.key\"\n\n\
         [nodes.mail]\nhostname = \"mail.example.org\"\nrole = \"primary\"\ndata_dir = \"mail-data\"\n\
         listen.smtp = [\"{PRIMARY_IP}:{port}\"]\nlisten.imaps = [\"127.0.0.1:0\"]\n\n\
         [nodes.mx2]\nhostname = \"mx2.example.org\"\nrole = \"backup\"\ndata_dir = \"mx2-data\"\n\
         listen.smtp = [\"{BACKUP_IP}:{port}\"]\nqueue.run_interval = \"2s\"\n\n\
         [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[outbound]\nmx_port = {port}\n\n\
         [dns]\nnameservers = [\"{}\"]\n\n[users.\"{USER}\"]\npassword = \"{}\"\n",
        dns.addr(),
        postern::auth::hash_password(common::PASSWORD)
    );
    let path = dir.join("postern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The header block of a message, unfolded, one string per field.
fn headers(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg).replace("\r\n", "\n");
    let mut fields: Vec<String> = Vec::new();
    for line in text.split("\n\n").next().unwrap_or("").lines() {
        match fields.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => fields.push(line.to_string()),
        }
    }
    fields
}

fn received(msg: &[u8]) -> Vec<String> {
    headers(msg).into_iter().filter(|f| f.to_ascii_lowercase().starts_with("received:")).collect()
}

/// How many messages in `msgs` carry `Message-ID: <id@peer.test>`.
fn count_id(msgs: &[Vec<u8>], id: &str) -> usize {
    let want = format!("message-id: <{id}@peer.test>");
    msgs.iter().filter(|m| headers(m).iter().any(|f| f.to_ascii_lowercase() == want)).count()
}

/// Postfix's log lines about the message with Message-ID `<id@peer.test>` (by its queue id).
fn postfix_lines(pf: &Postfix, id: &str) -> Vec<String> {
    let log = pf.maillog();
    let tag = format!("message-id=<{id}@peer.test>");
    let Some(qid) = log.lines().find(|l| l.contains(&tag)).and_then(|l| {
        let rest = l.split("]: ").nth(1)?;
        Some(rest.split(':').next()?.to_string())
    }) else {
        return Vec::new();
    };
    log.lines().filter(|l| l.contains(&format!(": {qid}: "))).map(str::to_string).collect()
}

/// Waits until Postfix logs the final `status=sent` for message `id`; returns its lines.
fn wait_sent(pf: &Postfix, id: &str, diag: &dyn Fn() -> String) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = postfix_lines(pf, id);
        if lines.iter().any(|l| l.contains("status=sent")) {
            return lines;
        }
        if lines.iter().any(|l| l.contains("status=bounced")) || Instant::now() >= deadline {
            panic!("Postfix did not deliver {id}:\n{}\n{}", lines.join("\n"), diag());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_inbox(node: &Node, count: usize, timeout: Duration, diag: &dyn Fn() -> String) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let msgs = inbox(node, USER);
        if msgs.len() >= count {
            return msgs;
        }
        if Instant::now() >= deadline {
            panic!("the INBOX has {} messages, waited for {count}\n{}", msgs.len(), diag());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn queue_list(node: &Node) -> String {
    let (ok, out) = node.cli(&["queue", "list"]);
    assert!(ok, "queue list failed: {out}");
    out
}

#[test]
fn postfix_chooses_primary_then_backup_by_mx_preference() {
    if let Some(why) = unavailable() {
        eprintln!("skipping backup_postfix: {why}");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = shared_port();
    let dns = TestDns::start(&format!(
        "example.org MX 10 mail.example.org\nexample.org MX 100 mx2.example.org\n\
         mail.example.org A {PRIMARY_IP}\nmx2.example.org A {BACKUP_IP}\n"
    ));
    let dnsmasq = Dnsmasq::start(dir.path());
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", dnsmasq.addr)).unwrap();

    let cluster = cluster_file(dir.path(), port, &dns);
    let mut primary = Node::start_named(&cluster, "mail");
    primary.cert = dir.path().join("cert.pem");
    let backup = Node::start_named(&cluster, "mx2");

    // No cached SMTP sessions: after the pause, Postfix must open a new session to MX 10 and
    // see the 421, not reuse one opened before the pause.
    let relayhost = format!("example.org:{port}");
    let pf = Postfix::start_with_resolver(
        Role::MxRelay { relayhost: &relayhost },
        "smtp_connection_cache_on_demand = no\n",
        &resolv,
    );
    let diag = || {
        format!(
            "postfix maillog:\n{}\nprimary log:\n{}\nbackup log:\n{}\nbackup queue:\n{}\ndnsmasq log:\n{}",
            pf.maillog(),
            primary.log(),
            backup.log(),
            backup.cli(&["queue", "list"]).1,
            dnsmasq.log()
        )
    };

    // 1. The primary is up: Postfix delivers to MX 10.
    pf.sendmail(SENDER, &message("bpf-one", USER));
    let lines = wait_sent(&pf, "bpf-one", &diag);
    let sent = lines.iter().find(|l| l.contains("status=sent")).unwrap();
    assert!(sent.contains(&format!("relay=mail.example.org[{PRIMARY_IP}]:{port}")), "{sent}\n{}", diag());
    let msgs = wait_inbox(&primary, 1, Duration::from_secs(20), &diag);
    assert_eq!(msgs.len(), 1, "{}", diag());
    assert_eq!(count_id(&msgs, "bpf-one"), 1);
    let trail = received(&msgs[0]);
    assert!(trail.iter().any(|r| r.contains("mail.example.org")), "{trail:#?}");
    assert!(trail.iter().any(|r| r.contains(postfix::HOSTNAME)), "{trail:#?}");
    assert!(!trail.iter().any(|r| r.contains("mx2")), "the direct message went through the backup: {trail:#?}");

    // 2. The primary is paused: MX 10 answers 421, Postfix falls back to MX 100, which queues.
    let (ok, out) = primary.cli(&["pause", "smtp"]);
    assert!(ok, "pause smtp: {out}");
    pf.sendmail(SENDER, &message("bpf-two", USER));
    let lines = wait_sent(&pf, "bpf-two", &diag);
    let text = lines.join("\n");
    assert!(
        text.contains(&format!("host mail.example.org[{PRIMARY_IP}] refused to talk to me: 421 4.3.2")),
        "Postfix did not try MX 10 first or got no 421 there:\n{text}"
    );
    let sent = lines.iter().find(|l| l.contains("status=sent")).unwrap();
    assert!(sent.contains(&format!("relay=mx2.example.org[{BACKUP_IP}]:{port}")), "{sent}\n{}", diag());
    let listed = queue_list(&backup);
    assert!(listed.contains(USER) && listed.contains(SENDER), "the backup does not hold the message:\n{listed}");
    // A few of the backup's queue runs (every 2 s) go by, and the primary stays untouched.
    std::thread::sleep(Duration::from_secs(5));
    let msgs = inbox(&primary, USER);
    assert_eq!(msgs.len(), 1, "mail reached the paused primary\n{}", diag());
    assert!(queue_list(&backup).contains(USER), "the backup let go of the message while the primary was paused");

    // 3. The primary resumes: the backup hands the message over within a few queue runs.
    let (ok, out) = primary.cli(&["resume", "smtp"]);
    assert!(ok, "resume smtp: {out}");
    let msgs = wait_inbox(&primary, 2, Duration::from_secs(30), &diag);
    common::wait_for("the backup's queue to empty", Duration::from_secs(10), || !queue_list(&backup).contains(USER));
    // Nothing more arrives afterwards (no duplicate from a second attempt).
    std::thread::sleep(Duration::from_secs(3));
    let msgs_after = inbox(&primary, USER);
    assert_eq!(msgs_after.len(), 2, "{}", diag());
    assert_eq!(msgs.len(), 2);
    assert_eq!(count_id(&msgs_after, "bpf-one"), 1);
    assert_eq!(count_id(&msgs_after, "bpf-two"), 1);
    let second = msgs_after.iter().find(|m| count_id(std::slice::from_ref(m), "bpf-two") == 1).unwrap();
    let trail = received(second);
    assert!(trail.iter().any(|r| r.contains("mx2.example.org")), "no backup hop in the trail: {trail:#?}");
    assert!(trail.iter().any(|r| r.contains("mail.example.org")), "{trail:#?}");
    assert!(trail.iter().any(|r| r.contains(postfix::HOSTNAME)), "the original client is missing: {trail:#?}");
    eprintln!("second message's Received trail:\n{}", trail.join("\n"));
    eprintln!("backup_postfix took {:.1?}", started.elapsed());
}
