//! Built-in ACME against a real Pebble CA: both challenge types end to end, renewal with a live
//! swap, and the failure paths (CA down at start, failing challenge, corrupted stored
//! certificate). Clients verify the served chain against Pebble's root with Python's ssl.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pebble::{free_port, Pebble, PebbleOptions};
use common::*;

const HOST: &str = "mx.example.test";

fn acme_setup(pebble: &Pebble, node_extra: String, acme_extra: &str) -> Setup {
    Setup {
        node_extra,
        extra: format!(
            "[acme]\ndirectory = {:?}\nca_file = {:?}\ncontact = \"mailto:postmaster@example.test\"\n\
             names = [\"imap.example.test\"]\ncheck_interval = \"1s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n{acme_extra}",
            pebble.directory_url(),
            pebble.ca_file().display().to_string()
        ),
        ..Setup::default()
    }
}

fn wait_log(node: &Node, needle: &str, count: usize, pebble: &Pebble) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while node.log().matches(needle).count() < count {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {count}× {needle:?}\nnode log:\n{}\npebble log:\n{}",
                node.log(),
                pebble.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects with TLS verifying against `root_pem` for `name`; returns the leaf's SHA-256 and SANs,
/// or the ssl error text. `mode`: "imaps" (implicit TLS) or "smtp" (STARTTLS).
fn peer_cert(node: &Node, root_pem: &str, name: &str, mode: &str) -> String {
    let port = if mode == "imaps" { node.imaps.port() } else { node.smtp.port() };
    let script = format!(
        r#"
import ssl, socket, smtplib, hashlib, sys
ctx = ssl.create_default_context(cadata={root_pem:?})
try:
    if {mode:?} == 'imaps':
        s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname={name:?})
        der = s.getpeercert(binary_form=True); info = s.getpeercert()
    else:
        c = smtplib.SMTP('127.0.0.1', {port}); c.ehlo('client.test'); c._host = {name:?}
        c.starttls(context=ctx); der = c.sock.getpeercert(binary_form=True); info = c.sock.getpeercert()
    sans = sorted(v for k, v in info['subjectAltName'] if k == 'DNS')
    print(hashlib.sha256(der).hexdigest(), ','.join(sans))
except ssl.SSLError as e:
    print('SSLERROR', e)
"#
    );
    let out = Command::new("python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn cert_status(node: &Node) -> String {
    let out = Command::new(bin()).args(["cert", "status", "--config"]).arg(&node.config).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn http01_obtains_a_certificate_served_on_every_listener() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    let node = Node::start(acme_setup(&pebble, format!("listen.http = [\"127.0.0.1:{http}\"]\n"), ""));
    // Until the CA answers, a self-signed certificate keeps STARTTLS working.
    assert!(node.log().contains("serving a self-signed one"), "{}", node.log());
    wait_log(&node, "acme certificate installed", 1, &pebble);
    let root = pebble.root_pem();
    let imaps = peer_cert(&node, &root, HOST, "imaps");
    assert!(imaps.ends_with(" imap.example.test,mx.example.test"), "{imaps}\n{}", node.log());
    let smtp = peer_cert(&node, &root, "imap.example.test", "smtp");
    assert_eq!(smtp, imaps, "SMTP STARTTLS serves the same certificate");
    assert!(node.log().contains("acme http-01 answered"));
    let status = cert_status(&node);
    assert!(
        status.contains("names       imap.example.test, mx.example.test")
            || status.contains("names       mx.example.test, imap.example.test"),
        "{status}"
    );
    assert!(status.contains("Pebble"), "{status}");
    assert!(status.contains("renewal     from"), "{status}");
    // Port 80 answers nothing but challenges.
    let mut d = Dialog::connect(format!("127.0.0.1:{http}").parse().unwrap());
    d.send_raw(b"GET /index.html HTTP/1.1\r\nHost: mx.example.test\r\n\r\n");
    assert!(d.line().starts_with("HTTP/1.1 404"));
    // The key and account are private to the node's user.
    use std::os::unix::fs::PermissionsExt;
    for f in ["key.pem", "account.json"] {
        let mode = std::fs::metadata(node.data_dir().join("acme").join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
}

#[test]
fn tls_alpn01_obtains_a_certificate() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    let node = Node::start(acme_setup(
        &pebble,
        format!("listen.https = [\"127.0.0.1:{tls}\"]\n"),
        "challenge = \"tls-alpn-01\"\n",
    ));
    wait_log(&node, "acme certificate installed", 1, &pebble);
    assert!(node.log().contains("acme tls-alpn-01 handshake") && node.log().contains("validation=true"));
    let imaps = peer_cert(&node, &pebble.root_pem(), HOST, "imaps");
    assert!(imaps.ends_with(" imap.example.test,mx.example.test"), "{imaps}");
}

#[test]
fn renewal_swaps_the_certificate_and_open_sessions_keep_working() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    // A renewal window longer than any certificate: every check renews.
    let node = Node::start(acme_setup(
        &pebble,
        format!("listen.http = [\"127.0.0.1:{http}\"]\n"),
        "renew_before = \"100000d\"\n",
    ));
    wait_log(&node, "acme certificate installed", 1, &pebble);
    let root = pebble.root_pem();
    let first = peer_cert(&node, &root, HOST, "imaps");
    // A session opened before the swap (trusting Pebble's root instead of the harness's cert).
    let root_file = node.dir.path().join("pebble-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let program = python_program(
        &node,
        "import sys\nm = login('alice@example.test'); m.select('INBOX')\nprint('ready'); sys.stdout.flush()\nsys.stdin.readline()\nprint(m.noop()[0]); m.logout()\n",
    )
    .replace(&format!("{:?}", node.cert.display().to_string()), &format!("{:?}", root_file.display().to_string()));
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(program)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let installed = node.log().matches("acme certificate installed").count();
    wait_log(&node, "acme certificate installed", installed + 1, &pebble);
    let second = peer_cert(&node, &root, HOST, "imaps");
    assert_ne!(first.split(' ').next(), second.split(' ').next(), "a new connection sees the new certificate");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "OK", "the session opened before the swap still works");
    child.wait().unwrap();
}

#[test]
fn ca_down_at_start_then_up() {
    let (http, tls) = (free_port(), free_port());
    let mut pebble = Pebble::start(PebbleOptions::new(http, tls));
    pebble.stop();
    let node = Node::start(acme_setup(&pebble, format!("listen.http = [\"127.0.0.1:{http}\"]\n"), ""));
    wait_log(&node, "acme order failed", 1, &pebble);
    // Mail still flows over STARTTLS with the self-signed certificate meanwhile.
    let (code, _) = send_message(&node, "a@peer.test", &["alice@example.test"], &message("down", "alice"));
    assert_eq!(code, 250);
    assert!(cert_status(&node).contains("last error"), "{}", cert_status(&node));
    pebble.restart();
    wait_log(&node, "acme certificate installed", 1, &pebble);
    let served = peer_cert(&node, &pebble.root_pem(), HOST, "imaps");
    assert!(!served.starts_with("SSLERROR"), "{served}");
}

#[test]
fn failing_challenge_is_logged_and_retried() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    // The node answers HTTP-01 on another port than the one the CA dials.
    let wrong = free_port();
    let node = Node::start(acme_setup(&pebble, format!("listen.http = [\"127.0.0.1:{wrong}\"]\n"), ""));
    wait_log(&node, "acme order failed", 2, &pebble);
    let log = node.log();
    assert!(log.contains("validation failed") || log.contains("waiting for validation"), "{log}");
    assert!(log.contains("retry_in="), "{log}");
    let status = cert_status(&node);
    assert!(status.contains("last error"), "{status}");
    assert!(peer_cert(&node, &pebble.root_pem(), HOST, "imaps").starts_with("SSLERROR"), "still self-signed");
}

#[test]
fn corrupted_stored_certificate_is_ordered_again() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    let mut node = Node::start(acme_setup(&pebble, format!("listen.http = [\"127.0.0.1:{http}\"]\n"), ""));
    wait_log(&node, "acme certificate installed", 1, &pebble);
    node.stop();
    std::fs::write(node.data_dir().join("acme/cert.pem"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let before = node.log().matches("acme certificate installed").count();
    node.launch();
    assert!(node.log().contains("stored certificate unusable"), "{}", node.log());
    wait_log(&node, "acme certificate installed", before + 1, &pebble);
    assert!(!peer_cert(&node, &pebble.root_pem(), HOST, "imaps").starts_with("SSLERROR"));
    assert_eq!(node.log().matches("acme account registered").count(), 1, "the stored account is reused");
}

/// HTTP-01 where another web server owns port 80: the node writes the challenge into a webroot
/// that a separate server (Python's http.server here) publishes.
#[test]
fn http01_through_a_webroot_served_by_another_server() {
    let (http, tls) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOptions::new(http, tls));
    let webroot = tempfile::tempdir().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _web = Kill(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(webroot.path())
            .arg(http.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let extra = format!("webroot = {:?}\n", webroot.path().display().to_string());
    let node = Node::start(acme_setup(&pebble, String::new(), &extra));
    wait_log(&node, "acme certificate installed", 1, &pebble);
    assert!(!peer_cert(&node, &pebble.root_pem(), HOST, "imaps").starts_with("SSLERROR"));
    let left = std::fs::read_dir(webroot.path().join(".well-known/acme-challenge")).unwrap().count();
    assert_eq!(left, 0, "challenge files are removed after the order");
}

/// A CA that requires External Account Binding: refused without it, issued with it.
#[test]
fn external_account_binding() {
    let (http, tls) = (free_port(), free_port());
    // Pebble takes the HMAC key base64url-encoded, as CAs hand them out.
    let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let mut opts = PebbleOptions::new(http, tls);
    opts.eab = Some(("kid-1".to_string(), key.to_string()));
    let pebble = Pebble::start(opts);
    let listen = format!("listen.http = [\"127.0.0.1:{http}\"]\n");
    let without = Node::start(acme_setup(&pebble, listen.clone(), ""));
    wait_log(&without, "acme order failed", 1, &pebble);
    assert!(without.log().to_lowercase().contains("external"), "{}", without.log());
    drop(without);
    let with = Node::start(acme_setup(&pebble, listen, &format!("eab_kid = \"kid-1\"\neab_hmac_key = \"{key}\"\n")));
    wait_log(&with, "acme certificate installed", 1, &pebble);
}
