//! OpenDKIM as a verifying milter for the Postfix peer, and dnsmasq serving the DKIM keys it
//! looks up.
//!
//! `Dnsmasq` answers on 127.0.0.153:53 (the only fixed address: OpenDKIM's resolver, libunbound,
//! needs a port-53 forwarder) with `--txt-record` entries. `OpenDkim` runs `opendkim -f -x CONF`
//! in verify mode (`Mode v`) on `inet:PORT@127.0.0.1`, resolving through an unbound config file
//! (`ResolverConfiguration`) that forwards everything to that dnsmasq. Two unbound defaults had to
//! go: `do-not-query-localhost` (it refuses loopback servers) and the RFC 6761 local zone `test.`
//! (it answers NXDOMAIN for example.test itself, and OpenDKIM reports "key not found in DNS").
//! Mail from `InternalHosts` is signed rather than verified, and the default list is 127.0.0.1,
//! where the test's peers are: the list names only 192.0.2.1. Both are killed on drop.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::pebble::free_port;

/// Where `Dnsmasq` listens (port 53).
pub const DNS_IP: &str = "127.0.0.153";

/// `postern dkim keygen ARGS`, as it ran.
pub fn keygen_output(args: &[&str]) -> std::process::Output {
    Command::new(crate::common::bin()).args(["dkim", "keygen"]).args(args).output().unwrap()
}

/// `postern dkim keygen ARGS`, asserting success; returns stdout.
pub fn keygen(args: &[&str]) -> String {
    let out = keygen_output(args);
    assert!(out.status.success(), "keygen {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `postern dns-records --config CONFIG`: zone lines (`NAME. TTL IN TYPE DATA`).
pub fn dns_records(config: &Path) -> String {
    let out = Command::new(crate::common::bin()).arg("dns-records").arg("--config").arg(config).output().unwrap();
    assert!(out.status.success(), "dns-records: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The DKIM key records (`SEL._domainkey.DOMAIN`, TXT value with its quoted pieces joined) in
/// zone lines as `postern dns-records` prints them.
pub fn dkim_txt_records(zone: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in zone.lines() {
        let line = line.trim();
        if line.starts_with(';') {
            continue;
        }
        let parts: Vec<&str> = line.splitn(5, char::is_whitespace).collect();
        if parts.len() == 5 && parts[3] == "TXT" && parts[0].contains("._domainkey.") {
            let value: String = parts[4].split('"').skip(1).step_by(2).collect();
            out.push((parts[0].trim_end_matches('.').to_string(), value));
        }
    }
    out
}

fn wait_gone(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// dnsmasq on 127.0.0.153:53 answering the given TXT records (and REFUSED/NXDOMAIN otherwise).
pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    pub fn start(txt: &[(String, String)]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dnsmasq.log");
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={DNS_IP}"),
            "--port=53".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
            format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()),
        ];
        for (name, value) in txt {
            // One character-string per 255 bytes, as in a real zone.
            let pieces: Vec<String> =
                value.as_bytes().chunks(255).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            args.push(format!("--txt-record={name},{}", pieces.join(",")));
        }
        let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut child = Command::new("dnsmasq")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("run dnsmasq (dnsmasq-base)");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dnsmasq exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
                );
            }
            // Ready once it answers a query over TCP (it binds UDP and TCP together).
            if std::net::TcpStream::connect((DNS_IP, 53)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "dnsmasq does not listen on {DNS_IP}:53");
            std::thread::sleep(Duration::from_millis(50));
        }
        Dnsmasq { child, log, _dir: dir }
    }

    /// The queries it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        wait_gone(&mut self.child);
    }
}

/// `opendkim -f -x CONF` verifying (`Mode v`), milter socket on `addr`.
pub struct OpenDkim {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl OpenDkim {
    /// A verifier writing `Authentication-Results: AUTHSERV_ID; dkim=...`, asking dnsmasq on
    /// 127.0.0.153 for keys.
    pub fn verifier(authserv_id: &str) -> OpenDkim {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let unbound = base.join("unbound.conf");
        std::fs::write(
            &unbound,
            format!(
                "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n\
                 \x20 local-zone: \"test.\" nodefault\n\
                 forward-zone:\n  name: \".\"\n  forward-addr: {DNS_IP}\n",
            ),
        )
        .unwrap();
        let conf = base.join("opendkim.conf");
        std::fs::write(
            &conf,
            format!(
                "Mode v\n\
                 Socket inet:{port}@127.0.0.1\n\
                 AuthservID {authserv_id}\n\
                 PidFile {pid}\n\
                 Syslog no\n\
                 LogResults yes\n\
                 LogWhy yes\n\
                 AlwaysAddARHeader yes\n\
                 InternalHosts 192.0.2.1\n\
                 ResolverConfiguration {unbound}\n\
                 Nameservers {DNS_IP}\n\
                 DNSTimeout 5\n\
                 UMask 007\n",
                pid = base.join("opendkim.pid").display(),
                unbound = unbound.display()
            ),
        )
        .unwrap();
        let stderr = std::fs::File::create(base.join("stderr")).unwrap();
        let mut child = Command::new("/usr/sbin/opendkim")
            .arg("-f")
            .arg("-x")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("run /usr/sbin/opendkim");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "opendkim exited ({status}): {}",
                    std::fs::read_to_string(base.join("stderr")).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "opendkim does not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        OpenDkim { child, addr, dir }
    }

    /// Its `inet:` socket spec for Postfix's `smtpd_milters`.
    pub fn milter(&self) -> String {
        format!("inet:{}:{}", self.addr.ip(), self.addr.port())
    }

    /// What it wrote to stderr (its per-message log lines go to syslog, absent here).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        wait_gone(&mut self.child);
    }
}
