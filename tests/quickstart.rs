//! `postern quickstart` and `postern dns-check`: a new cluster written into a temporary
//! directory loads, passes `check-config`, runs and accepts mail for its user; the DNS records it
//! prints, served by the test DNS, pass `dns-check`, and wrong or missing ones are reported; a
//! backup node joins the cluster file; nothing is overwritten and a failure leaves nothing behind.
//! Every check and connection stays on 127.0.0.0/8.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::dns::TestDns;
use common::{bin, Dialog};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("POSTERN_CONFIG").output().expect("run postern")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `postern quickstart ARGS`, asserting success; returns stdout.
fn quickstart_ok(args: &[&str]) -> String {
    let out = run(&[&["quickstart"], args].concat());
    assert!(out.status.success(), "quickstart {args:?}:\n{}", text(&out));
    stdout(&out)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A "mail server" on loopback for the outbound port 25 check: greets every connection with 220.
fn smtp_probe() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"220 probe.test ESMTP\r\n");
        }
    });
    addr
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn dns_check(config: &Path, dns: &TestDns, extra: &[&str]) -> Output {
    let ns = dns.addr().to_string();
    run(&[&["dns-check", "--config", path(config), "--nameserver", &ns], extra].concat())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// The zone text without the records whose line contains `pattern`.
fn without(zone: &str, pattern: &str) -> String {
    zone.lines().filter(|l| l.starts_with(';') || !l.contains(pattern)).collect::<Vec<_>>().join("\n")
}

/// A node started from a quickstart config with every listener moved to 127.0.0.1:0.
struct Running {
    child: Child,
    smtp: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(config: &Path, node: &str, dns: &TestDns) -> Running {
    let mut text = std::fs::read_to_string(config).unwrap();
    for port in [25, 465, 587, 143, 993, 80] {
        text = text.replace(&format!("\"0.0.0.0:{port}\""), "\"127.0.0.1:0\"");
    }
    text.push_str(&format!("\n[dns]\nnameservers = [\"{}\"]\n", dns.addr()));
    let local = config.with_file_name("local.toml");
    std::fs::write(&local, text).unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--config", path(&local), "--node", node])
        .env("POSTERN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut smtp = None;
    for line in lines {
        let line = line.unwrap();
        if let Some((proto, addr)) = postern::server::parse_listening_line(&line) {
            if proto == "smtp" {
                smtp = Some(addr);
            }
        }
        if line.starts_with("postern ready") {
            break;
        }
    }
    Running { child, smtp: smtp.expect("the node listens for smtp") }
}

fn deliver(smtp: SocketAddr, to: &str) -> u16 {
    let mut d = Dialog::connect(smtp);
    assert_eq!(d.reply().0, 220);
    d.cmd("EHLO client.test", 250);
    d.cmd("MAIL FROM:<someone@elsewhere.test>", 250);
    d.cmd(&format!("RCPT TO:<{to}>"), 250);
    d.cmd("DATA", 354);
    d.send_raw(b"From: someone@elsewhere.test\r\nSubject: hi\r\n\r\nhello\r\n.\r\n");
    let (code, _) = d.reply();
    d.send("QUIT");
    code
}

struct Primary {
    dir: tempfile::TempDir,
    config: PathBuf,
    zone: String,
    dns: TestDns,
}

/// Quickstart of a new primary for alice@example.test at mail.example.test (203.0.113.7: DNS
/// data only, nothing connects there; the resolver answers `localhost` for loopback PTRs).
fn primary(extra: &[&str]) -> Primary {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let data = dir.path().join("data");
    let dns = TestDns::start("");
    let ns = dns.addr().to_string();
    let zone = quickstart_ok(
        &[
            &[
                "alice@example.test",
                "--hostname",
                "mail.example.test",
                "--dir",
                path(&etc),
                "--data-dir",
                path(&data),
                "--address",
                "203.0.113.7",
                "--nameserver",
                &ns,
                "--no-acme",
            ],
            extra,
        ]
        .concat(),
    );
    Primary { config: etc.join("postern.toml"), dir, zone, dns }
}

#[test]
fn a_new_primary_loads_serves_and_its_records_pass_dns_check() {
    let probe = smtp_probe().to_string();
    let p = primary(&["--smtp-probe", &probe]);
    let etc = p.config.parent().unwrap();

    // The files, private where they hold secrets.
    let month = chrono::Utc::now().format("%Y%m").to_string();
    let keys = [format!("example.test-{month}a.key"), format!("example.test-{month}b.key")];
    assert_eq!(files_in(etc), ["cluster.key", "dkim", "postern.toml", "srs.secret"]);
    assert_eq!(files_in(&etc.join("dkim")), keys);
    for f in ["cluster.key", "srs.secret", "postern.toml"] {
        assert_eq!(mode(&etc.join(f)), 0o600, "{f}");
    }
    for k in &keys {
        assert_eq!(mode(&etc.join("dkim").join(k)), 0o600, "{k}");
    }

    // The project's own loader and check-config accept it.
    let out = run(&["check-config", "--config", path(&p.config)]);
    assert!(out.status.success(), "{}", text(&out));
    let config = postern::config::load_file(&p.config).expect("the config loads");
    assert_eq!(config.cluster.domains, ["example.test"]);
    assert_eq!(config.dkim.len(), 1, "one active key; the standby one is commented out");
    assert!(config.srs.is_some() && config.cluster.secret_file.is_some());
    let cfg_text = std::fs::read_to_string(&p.config).unwrap();
    assert!(cfg_text.contains(&format!("# selector = \"{month}b\"")), "{cfg_text}");
    assert!(!cfg_text.contains("could not reach"), "port 25 was reachable:\n{cfg_text}");

    // The password is printed once, and it is the one hashed in the config.
    let password = p
        .zone
        .lines()
        .find_map(|l| l.strip_prefix("; user alice@example.test password "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the password line")
        .to_string();
    assert!(postern::auth::verify_password(&config.users["alice@example.test"].password_hash, &password));
    assert!(!cfg_text.contains(&password));

    // Checks: the name is fine, DNS is empty so far, outbound SMTP reaches the probe.
    assert!(p.zone.contains("; ok: mail.example.test is a fully qualified host name"), "{}", p.zone);
    assert!(p.zone.contains("; WARNING: mail.example.test has no A or AAAA record in DNS"), "{}", p.zone);
    assert!(p.zone.contains(&format!("; ok: outbound SMTP works: {probe} greeted with 220")), "{}", p.zone);
    assert!(
        p.zone.contains("; WARNING: 203.0.113.7 is not an address of this machine")
            || p.zone.contains("; WARNING: mail.example.test is at 203.0.113.7 but this machine only has"),
        "{}",
        p.zone
    );

    // The records, with a comment on each.
    for record in [
        "example.test. 3600 IN MX 10 mail.example.test.",
        "mail.example.test. 3600 IN A 203.0.113.7",
        "7.113.0.203.in-addr.arpa. 3600 IN PTR mail.example.test.",
        "example.test. 3600 IN TXT \"v=spf1 mx -all\"",
        "mail.example.test. 3600 IN TXT \"v=spf1 a -all\"",
        "_dmarc.example.test. 3600 IN TXT \"v=DMARC1; p=quarantine; adkim=r; aspf=r\"",
    ] {
        let i = p.zone.find(record).unwrap_or_else(|| panic!("{record} missing in\n{}", p.zone));
        let before = p.zone[..i].trim_end().lines().last().unwrap();
        assert!(before.starts_with("; "), "no comment before {record}");
    }
    for sel in [format!("{month}a"), format!("{month}b")] {
        let line = p
            .zone
            .lines()
            .find(|l| l.starts_with(&format!("{sel}._domainkey.example.test. 3600 IN TXT \"v=DKIM1; k=rsa; p=")))
            .unwrap_or_else(|| panic!("no DKIM record for {sel}"));
        // RSA 2048 keys do not fit in one character-string.
        let pieces: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(pieces.len() >= 2 && pieces.iter().all(|s| s.len() <= 255), "{line}");
    }
    // Every line is a record or a comment: the whole output is a zone fragment.
    for line in p.zone.lines().filter(|l| !l.is_empty() && !l.starts_with(';')) {
        assert!(line.contains(" 3600 IN "), "not a record: {line:?}");
    }

    // Published as printed, the records pass dns-check.
    p.dns.set_zone(&p.zone);
    let out = dns_check(&p.config, &p.dns, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let report = stdout(&out);
    for ok in [
        "ok: MX 10 mail.example.test for example.test (node `mail`)",
        "ok: reverse DNS of 203.0.113.7 is mail.example.test",
        "ok: SPF of example.test allows node `mail` (203.0.113.7)",
        "ok: SPF of mail.example.test allows 203.0.113.7 (HELO)",
        "ok: example.test has a DMARC record",
        &format!("ok: DKIM key {month}a._domainkey.example.test matches"),
        "the DNS records are in place",
    ] {
        assert!(report.contains(ok), "{ok:?} missing in\n{report}");
    }

    // Missing and wrong records are reported with their fix, and the exit status is 1.
    let mut broken = without(&without(&p.zone, "_dmarc"), "IN PTR");
    broken = broken.replace("\"v=spf1 mx -all\"", "\"v=spf1 ip4:192.0.2.1 -all\"");
    broken = without(&broken, &format!("{month}a._domainkey"));
    broken.push_str("\nexample.test. 3600 IN MX 20 old-mx.example.net.\n");
    p.dns.set_zone(&broken);
    let out = dns_check(&p.config, &p.dns, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = stdout(&out);
    for problem in [
        "problem: example.test has no DMARC record\n  fix: publish `_dmarc.example.test. 3600 IN TXT \"v=DMARC1;",
        "problem: 203.0.113.7 has no reverse DNS (PTR) record\n  fix: ask the provider of 203.0.113.7",
        "problem: SPF of example.test (\"v=spf1 ip4:192.0.2.1 -all\") does not allow node `mail` (203.0.113.7): Fail",
        &format!("problem: {month}a._domainkey.example.test is not published"),
        "problem: example.test has MX 20 old-mx.example.net, which is not a node of the cluster",
        "5 problem(s)",
    ] {
        assert!(report.contains(problem), "{problem:?} missing in\n{report}");
    }
    assert!(
        report.contains(&format!("fix: publish `{month}a._domainkey.example.test. 3600 IN TXT \"v=DKIM1; k=rsa; p="))
    );

    // A node started from the file (listeners moved to loopback) accepts mail for the user.
    p.dns.set_zone(&p.zone);
    let node = serve(&p.config, "mail", &p.dns);
    assert_eq!(deliver(node.smtp, "alice@example.test"), 250);
    assert_eq!(deliver(node.smtp, "postmaster@example.test"), 250);
    drop(node);
    drop(p.dir);
}

#[test]
fn checks_find_the_published_names_and_a_blocked_port_25() {
    let dns = TestDns::start(
        "mail.example.test. 3600 IN A 127.0.0.1\nmail.example.test. 3600 IN A 203.0.113.7\n\
         7.113.0.203.in-addr.arpa. 3600 IN PTR mail.example.test.\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let closed = closed_port().to_string();
    let ns = dns.addr().to_string();
    let data = dir.path().join("data");
    let quickstart = |etc: &Path, extra: &[&str]| {
        let base = ["alice@example.test", "--hostname", "mail.example.test", "--nameserver", &ns];
        let more = ["--smtp-probe", &closed, "--dir", path(etc), "--data-dir", path(&data)];
        quickstart_ok(&[&base[..], &more[..], extra].concat())
    };
    let zone = quickstart(&etc, &["--address", "203.0.113.7"]);
    for line in [
        "; ok: mail.example.test resolves to 127.0.0.1, 203.0.113.7",
        "; ok: reverse DNS of 203.0.113.7 is mail.example.test",
        &format!("; WARNING: outbound SMTP to {closed} failed"),
        ";   fix: many providers block outbound port 25",
    ] {
        assert!(zone.contains(line), "{line:?} missing in\n{zone}");
    }
    // With ACME (the default) the file has [acme] and port 80, and still loads.
    let config = etc.join("postern.toml");
    let file = std::fs::read_to_string(&config).unwrap();
    assert!(file.contains("[acme]\n") && file.contains("listen.http = [\"0.0.0.0:80\"]"), "{file}");
    assert!(file.contains("contact = \"mailto:alice@example.test\""), "{file}");
    assert!(file.contains("# quickstart could not reach any mail server on port 25"), "{file}");
    let out = run(&["check-config", "--config", path(&config)]);
    assert!(out.status.success(), "{}", text(&out));

    // An address of this machine: no NAT in the way.
    let zone = quickstart(&dir.path().join("etc2"), &["--address", "127.0.0.1", "--no-acme"]);
    assert!(zone.contains("; ok: 127.0.0.1 is on this machine: no NAT in the way"), "{zone}");
}

#[test]
fn a_backup_node_joins_the_cluster_file() {
    let p = primary(&["--no-checks"]);
    let before = std::fs::read_to_string(&p.config).unwrap();
    let data2 = p.dir.path().join("data2");
    let args = [
        "alice@example.test",
        "--role",
        "backup",
        "--hostname",
        "mx2.example.test",
        "--cluster-file",
        path(&p.config),
        "--address",
        "203.0.113.8",
        "--data-dir",
        path(&data2),
        "--no-checks",
    ];
    let zone = quickstart_ok(&args);
    let after = std::fs::read_to_string(&p.config).unwrap();
    assert!(after.starts_with(&before), "the file's own text (comments included) is kept:\n{after}");
    assert!(after.contains("[nodes.mx2]\n") && after.contains("role = \"backup\""), "{after}");
    assert!(!zone.contains("password"), "a backup has no user:\n{zone}");
    let config = postern::config::load_file(&p.config).unwrap();
    assert_eq!(config.nodes.keys().collect::<Vec<_>>(), ["mail", "mx2"]);
    assert!(config.nodes["mx2"].listen.imap.is_empty() && !config.nodes["mx2"].listen.smtp.is_empty());
    let out = run(&["check-config", "--config", path(&p.config), "--node", "mx2"]);
    assert!(out.status.success(), "{}", text(&out));

    // Only what the backup adds: its MX (preference 100), address, reverse name, HELO SPF.
    let records: Vec<&str> = zone.lines().filter(|l| !l.is_empty() && !l.starts_with(';')).collect();
    assert_eq!(
        records,
        [
            "example.test. 3600 IN MX 100 mx2.example.test.",
            "mx2.example.test. 3600 IN TXT \"v=spf1 a -all\"",
            "mx2.example.test. 3600 IN A 203.0.113.8",
            "8.113.0.203.in-addr.arpa. 3600 IN PTR mx2.example.test.",
        ]
    );

    // The primary's records and the backup's together pass dns-check for the whole cluster.
    let all = format!("{}\n{zone}", p.zone);
    p.dns.set_zone(&all);
    let out = dns_check(&p.config, &p.dns, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("ok: SPF of example.test allows node `mx2` (203.0.113.8)"), "{}", text(&out));
    let out = dns_check(&p.config, &p.dns, &["--node", "mx2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("DKIM"), "a backup signs nothing:\n{}", text(&out));

    // Bad arguments are errors, not reports.
    let out = dns_check(&p.config, &p.dns, &["--node", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no node named \"nope\""), "{}", text(&out));
    let out = dns_check(&p.dir.path().join("missing.toml"), &p.dns, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot read the config file"), "{}", text(&out));

    // A backup preferred over the primary is a problem.
    p.dns.set_zone(&all.replace("MX 100 mx2", "MX 5 mx2"));
    let out = dns_check(&p.config, &p.dns, &["--node", "mx2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout(&out).contains(
            "problem: the MX preference of backup `mx2` (5) is not higher than that of primary `mail` (10) for example.test"
        ),
        "{}",
        text(&out)
    );
    assert!(stdout(&out).contains("fix: publish `example.test. 3600 IN MX 100 mx2.example.test.`"), "{}", text(&out));

    // The same node again: refused, the file untouched.
    let out = run(&[&["quickstart"], &args[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already has a node named \"mx2\""), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&p.config).unwrap(), after);

    // A backup needs a cluster to join.
    let out =
        run(&["quickstart", "alice@example.test", "--role", "backup", "--dir", path(p.dir.path()), "--no-checks"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["quickstart", "alice@example.test", "--role", "backup", "--no-checks"]);
    assert!(text(&out).contains("a backup node joins an existing cluster"), "{}", text(&out));
}

#[test]
fn never_overwrites_and_leaves_nothing_behind_on_failure() {
    let base = tempfile::tempdir().unwrap();
    let common = ["--hostname", "mail.example.test", "--no-checks", "--no-acme", "--address", "127.0.0.1"];

    // An existing config: refused before anything is written.
    let dir = base.path().join("existing");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("postern.toml"), "keep me\n").unwrap();
    let out = run(&[&["quickstart", "alice@example.test", "--dir", path(&dir)], &common[..]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("never overwrites"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(dir.join("postern.toml")).unwrap(), "keep me\n");
    assert_eq!(files_in(&dir), ["postern.toml"]);

    // A step fails halfway (the DKIM directory cannot be created): what was written is removed.
    let dir = base.path().join("halfway");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("dkim"), "a file where the key directory goes\n").unwrap();
    let out = run(&[&["quickstart", "alice@example.test", "--dir", path(&dir)], &common[..]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(files_in(&dir), ["dkim"], "{}", text(&out));

    // Adding a node whose hostname another node has: refused, the cluster file untouched.
    let p = primary(&["--no-checks"]);
    let before = std::fs::read_to_string(&p.config).unwrap();
    let out = run(&[
        "quickstart",
        "alice@example.test",
        "--role",
        "backup",
        "--hostname",
        "mail.example.test",
        "--node",
        "mx2",
        "--cluster-file",
        path(&p.config),
        "--no-checks",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("already has a node with hostname mail.example.test"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&p.config).unwrap(), before);

    // Bad input is a clear error, not a panic.
    let out = run(&["quickstart", "not-an-address", "--dir", path(&base.path().join("x")), "--no-checks"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("is not an email address"), "{}", text(&out));
    assert!(!base.path().join("x").exists());
}
