//! A private Postfix instance as a real peer MTA: run as root from its own config directory
//! (`postfix -c DIR start`, `postfix -c DIR stop` on drop) with its queue, data directory, log
//! file and Maildirs under one tempdir, smtpd on `127.0.0.1:PORT` with a free port.
//!
//! Two roles: the receiving MX for `dest.example` (virtual Maildirs, STARTTLS offered with a
//! self-signed certificate, TLS details in its Received header), and a sender that relays every
//! message to a fixed host (`relayhost = [127.0.0.1]:PORT`, opportunistic STARTTLS), fed with
//! Postfix's own `sendmail`; or a sender that picks the MX hosts of a domain by preference
//! (`relayhost = DOMAIN:PORT`), with its DNS from a resolv.conf of the test's choosing.
//!
//! Needs the `postfix` Debian package (the test command installs it) and root. Notes from making
//! it run on Debian 12 (Postfix 3.7): with no syslog, `postfix` prints fatal errors only to a tty
//! or to `maillog_file`, which must match `maillog_file_prefixes`; `data_directory` must be owned
//! by `mail_owner` (master.lock); every directory above the queue must be searchable by `postfix`.
#![allow(dead_code)]

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::pebble::free_port;

/// The domain a `Role::Mx` instance receives for.
pub const MX_DOMAIN: &str = "dest.example";
/// The name the instance greets with and writes in its Received headers.
pub const HOSTNAME: &str = "postfix.peer.test";
/// Owner of the Maildirs (`virtual_uid_maps`/`virtual_gid_maps`): `nobody`/`nogroup`.
const MAILDIR_ID: u32 = 65534;

pub enum Role<'a> {
    /// Receiving MX for `dest.example` with a Maildir for each of these local parts; any other
    /// recipient there gets `550 5.1.1`.
    Mx { mailboxes: &'a [&'a str] },
    /// Sends every message to this host (`relayhost = [IP]:PORT`), STARTTLS when offered.
    Relay { relayhost: SocketAddr },
    /// Sends every message to `relayhost` as written, e.g. `example.org:2525`: without brackets
    /// Postfix looks up the domain's MX hosts and tries them by preference on that port,
    /// STARTTLS when offered. DNS goes through the system resolver (see `start_with_resolver`).
    MxRelay { relayhost: &'a str },
}

pub struct Postfix {
    pub dir: tempfile::TempDir,
    /// The config directory (`postfix -c`).
    pub conf: PathBuf,
    /// Where its smtpd listens.
    pub addr: SocketAddr,
    running: bool,
}

fn user_ids(name: &str) -> (u32, u32) {
    let c = CString::new(name).unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(!pw.is_null(), "no user {name}: is the postfix package installed?");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn mkdir(path: &Path, mode: u32, owner: Option<(u32, u32)>) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g)).unwrap();
    }
}

/// The services a sending and receiving Postfix needs, unchrooted, smtpd on `addr`.
fn master_cf(addr: SocketAddr) -> String {
    let mut s = format!("{addr} inet n - n - - smtpd\n");
    for line in [
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "tlsmgr unix - - n 1000? 1 tlsmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "proxywrite unix - - n - 1 proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "local unix - n n - - local",
        "virtual unix - n n - - virtual",
        "lmtp unix - - n - - lmtp",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ] {
        s.push_str(line);
        s.push('\n');
    }
    s
}

impl Postfix {
    /// The receiving MX for `dest.example`.
    pub fn mx(mailboxes: &[&str]) -> Postfix {
        Postfix::start(Role::Mx { mailboxes })
    }

    /// The receiving MX for `dest.example` with `extra` appended to main.cf (e.g. milters).
    pub fn mx_with(mailboxes: &[&str], extra: &str) -> Postfix {
        Postfix::start_with(Role::Mx { mailboxes }, extra)
    }

    /// A sender relaying everything to `relayhost`.
    pub fn relay_to(relayhost: SocketAddr) -> Postfix {
        Postfix::start(Role::Relay { relayhost })
    }

    pub fn start(role: Role<'_>) -> Postfix {
        Postfix::start_with(role, "")
    }

    /// `start` with `extra` (main.cf lines) appended to the generated main.cf.
    pub fn start_with(role: Role<'_>, extra: &str) -> Postfix {
        Postfix::start_inner(role, extra, None)
    }

    /// `start_with`, the instance running in its own mount namespace where `resolv_conf` is
    /// bind-mounted over /etc/resolv.conf (`unshare -m`; the daemons are not chrooted, and the
    /// master and its children stay in that namespace), so its DNS lookups go to the name
    /// servers `resolv_conf` lists, e.g. a dnsmasq on a loopback address.
    pub fn start_with_resolver(role: Role<'_>, extra: &str, resolv_conf: &Path) -> Postfix {
        Postfix::start_inner(role, extra, Some(resolv_conf))
    }

    fn start_inner(role: Role<'_>, extra: &str, resolv_conf: Option<&Path>) -> Postfix {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_path_buf();
        let postfix_ids = user_ids("postfix");
        // The daemons run as `postfix` and must reach the queue below this directory.
        mkdir(&base, 0o755, None);
        let conf = base.join("conf");
        mkdir(&conf, 0o755, None);
        mkdir(&base.join("queue"), 0o755, None);
        mkdir(&base.join("data"), 0o700, Some(postfix_ids));
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {base}/queue\n\
             data_directory = {base}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             myhostname = {HOSTNAME}\n\
             mydomain = peer.test\n\
             myorigin = peer.test\n\
             mydestination =\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             maillog_file_prefixes = {base}\n\
             maillog_file = {base}/maillog\n\
             biff = no\n\
             smtputf8_enable = no\n\
             smtpd_tls_loglevel = 1\n\
             smtp_tls_loglevel = 1\n",
            base = base.display()
        );
        match role {
            Role::Mx { mailboxes } => {
                mkdir(&base.join("mail"), 0o755, Some((MAILDIR_ID, MAILDIR_ID)));
                let map: String =
                    mailboxes.iter().map(|m| format!("{m}@{MX_DOMAIN} {m}/\n")).collect::<String>() + "\n";
                std::fs::write(conf.join("vmailbox"), map).unwrap();
                let cert = rcgen::generate_simple_self_signed(vec![format!("mx.{MX_DOMAIN}")]).unwrap();
                std::fs::write(conf.join("cert.pem"), cert.cert.pem()).unwrap();
                std::fs::write(conf.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
                std::fs::set_permissions(conf.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
                main.push_str(&format!(
                    "virtual_mailbox_domains = {MX_DOMAIN}\n\
                     virtual_mailbox_base = {base}/mail\n\
                     virtual_mailbox_maps = texthash:{conf}/vmailbox\n\
                     virtual_uid_maps = static:{MAILDIR_ID}\n\
                     virtual_gid_maps = static:{MAILDIR_ID}\n\
                     smtpd_tls_security_level = may\n\
                     smtpd_tls_cert_file = {conf}/cert.pem\n\
                     smtpd_tls_key_file = {conf}/key.pem\n\
                     smtpd_tls_received_header = yes\n",
                    base = base.display(),
                    conf = conf.display()
                ));
            }
            Role::Relay { relayhost } => {
                main.push_str(&format!(
                    "relayhost = [{}]:{}\n\
                     smtp_tls_security_level = may\n\
                     smtp_dns_support_level = disabled\n",
                    relayhost.ip(),
                    relayhost.port()
                ));
            }
            Role::MxRelay { relayhost } => {
                main.push_str(&format!("relayhost = {relayhost}\nsmtp_tls_security_level = may\n"));
            }
        }
        main.push_str(extra);
        std::fs::write(conf.join("main.cf"), main).unwrap();
        std::fs::write(conf.join("master.cf"), master_cf(addr)).unwrap();
        let mut pf = Postfix { dir, conf, addr, running: false };
        let out = match resolv_conf {
            None => pf.command("postfix").arg("start").output().expect("run postfix"),
            Some(resolv) => {
                let script = format!(
                    "mount --bind '{}' /etc/resolv.conf && exec /usr/sbin/postfix -c '{}' start",
                    resolv.display(),
                    pf.conf.display()
                );
                Command::new("unshare")
                    .args(["-m", "sh", "-c", &script])
                    .env("MAIL_CONFIG", &pf.conf)
                    .output()
                    .expect("run unshare")
            }
        };
        if !out.status.success() {
            panic!(
                "postfix start failed: {}\n{}{}\nmaillog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pf.maillog()
            );
        }
        pf.running = true;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "postfix does not listen on {addr}; maillog:\n{}", pf.maillog());
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    /// A Postfix command (`postfix`, `postqueue`, `sendmail`, `postconf`) for this instance.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(format!("/usr/sbin/{program}"));
        c.env("MAIL_CONFIG", &self.conf);
        if program != "sendmail" {
            c.arg("-c").arg(&self.conf);
        }
        c
    }

    /// Everything Postfix logged (`maillog_file`).
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The messages delivered to `local@dest.example` (its Maildir's `new/`), oldest first.
    pub fn maildir(&self, local: &str) -> Vec<Vec<u8>> {
        let new = self.dir.path().join("mail").join(local).join("new");
        let Ok(rd) = std::fs::read_dir(&new) else { return Vec::new() };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
            .collect();
        files.sort();
        files.into_iter().filter_map(|(_, p)| std::fs::read(p).ok()).collect()
    }

    /// Injects a message with Postfix's `sendmail -f FROM -t` (recipients from its headers).
    pub fn sendmail(&self, from: &str, message: &str) {
        let mut child = self
            .command("sendmail")
            .args(["-C"])
            .arg(&self.conf)
            .args(["-f", from, "-t", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sendmail");
        child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sendmail failed: {}\n{}{}\nmaillog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.maillog()
        );
    }

    /// `postqueue -f`: attempt every queued message now.
    pub fn flush(&self) {
        let out = self.command("postqueue").arg("-f").output().expect("postqueue");
        assert!(out.status.success(), "postqueue -f: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `postqueue -p`: the queue listing.
    pub fn queue(&self) -> String {
        let out = self.command("postqueue").arg("-p").output().expect("postqueue");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until a message for `local@dest.example` arrives; panics with the maillog if not.
    pub fn wait_for_maildir(&self, local: &str, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.maildir(local);
            if msgs.len() >= count {
                return msgs;
            }
            if Instant::now() >= deadline {
                panic!("no mail for {local}@{MX_DOMAIN}; postfix maillog:\n{}", self.maillog());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn master_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.path().join("queue/pid/master.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// `postfix stop`, waiting for the master to exit (killed after 10 s).
    pub fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let pid = self.master_pid();
        let _ = self.command("postfix").arg("stop").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(pid) = pid {
            // SAFETY: signal 0 only probes whether the process exists.
            let alive = || unsafe { libc::kill(pid, 0) } == 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive() {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}
