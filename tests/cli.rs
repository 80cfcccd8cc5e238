//! The command line: check-config on good and bad files (every error, with file, line and key),
//! hash-password, node selection, and the development node of `postern serve` with no config.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bin;

fn check(text: &str, node: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["check-config", "--config"]).arg(&path).env_remove("POSTERN_CONFIG");
    if let Some(n) = node {
        cmd.args(["--node", n]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

fn base() -> String {
    format!(
        "[cluster]\ndomains = [\"example.org\"]\n\n[nodes.mail]\nhostname = \"mail.example.org\"\n\
         data_dir = \"/var/lib/postern\"\nlisten.smtp = [\"127.0.0.1:25\"]\n\n[users.\"alice@example.org\"]\npassword = \"{HASH}\"\n"
    )
}

#[test]
fn a_good_file_prints_the_effective_settings_without_secrets() {
    let (code, out, err) = check(&base(), None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node        mail (primary)"), "{out}");
    assert!(out.contains("listen      smtp        127.0.0.1:25"), "{out}");
    assert!(out.contains("max_message_size=50MB"), "{out}");
    assert!(!out.contains("argon2"), "no password hash in the output");
}

#[test]
fn each_kind_of_bad_file_is_refused_with_file_line_and_key() {
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (base() + "colour = \"blue\"\n", 11, "colour", "unknown key"),
        (base().replace("data_dir = \"/var/lib/postern\"", "data_dir = 5"), 6, "nodes.mail.data_dir", ""),
        (
            base().replace("role", "x") + "[users.\"bob@elsewhere.example\"]\npassword = \"" + HASH + "\"\n",
            11,
            "bob@elsewhere.example",
            "example.org",
        ),
        (
            base() + "[aliases]\n\"a@example.org\" = \"b@example.org\"\n\"b@example.org\" = \"a@example.org\"\n",
            12,
            "a@example.org",
            "loop",
        ),
        (
            base() + "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            12,
            "tls.cert",
            "/nonexistent/cert.pem",
        ),
        (base().replace(HASH, "hunter2"), 10, "password", "hash-password"),
        (base() + "[smtp]\ncommand_timeout = \"5 fortnights\"\n", 12, "smtp.command_timeout", ""),
        (
            base().replace("listen.smtp = [\"127.0.0.1:25\"]", "listen.smtp = [\"127.0.0.1:99999\"]"),
            7,
            "listen.smtp",
            "",
        ),
        ("[cluster\ndomains = []\n".to_string(), 1, "", "TOML"),
    ];
    for (text, line, key, words) in cases {
        let (code, _, err) = check(&text, None);
        assert_eq!(code, 1, "refused:\n{text}\n{err}");
        assert!(err.contains(&format!("bad.toml:{line}:")), "line {line} named in:\n{err}\nfor:\n{text}");
        assert!(err.contains(key), "key {key} named in:\n{err}");
        assert!(err.contains(words), "{words:?} in:\n{err}");
    }
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let text =
        base().replace("hostname = \"mail.example.org\"", "hostname = 42") + "typo = 1\n[smtp]\nmax_recipients = 0\n";
    let (code, _, err) = check(&text, None);
    assert_eq!(code, 1);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("bad.toml:") && !l.contains("error(s)")).collect();
    assert_eq!(errors.len(), 3, "{err}");
    assert!(err.contains("3 error(s)"));
}

#[test]
fn node_selection() {
    // A cluster with a backup needs its node secret.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "a cluster secret of 32 characters\n").unwrap();
    let with_secret = base().replace("[cluster]\n", &format!("[cluster]\nsecret_file = {:?}\n", secret.path()));
    let two = with_secret + "\n[nodes.mx2]\nhostname = \"mx2.example.org\"\nrole = \"backup\"\n";
    let (code, _, err) = check(&two, None);
    assert_eq!(code, 1);
    assert!(err.contains("mail, mx2"), "lists the nodes: {err}");
    let (code, out, _) = check(&two, Some("mx2"));
    assert_eq!(code, 0);
    assert!(out.contains("mx2 (backup)"));
    let (code, _, err) = check(&two, Some("nope"));
    assert_eq!(code, 1);
    assert!(err.contains("no node named \"nope\""), "{err}");
}

#[test]
fn serve_refuses_a_bad_file_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let data = dir.path().join("data");
    std::fs::write(&path, base().replace("/var/lib/postern", data.to_str().unwrap()) + "oops = true\n").unwrap();
    let out = Command::new(bin()).args(["serve", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.toml:11: users.\"alice@example.org\".oops: unknown key"), "{err}");
    assert!(!data.exists(), "no data directory was created");
    let out = Command::new(bin()).args(["serve", "--config", "/nonexistent/postern.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such config file"));
}

#[test]
fn hash_password_from_stdin() {
    let mut child =
        Command::new(bin()).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret pass\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"));
    assert!(postern::auth::verify_password(hash.trim(), "s3cret pass"));
    let out = Command::new(bin()).arg("hash-password").stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "an empty password is refused");
}

/// `postern serve` with no config file: a development node on 127.0.0.1's high ports, its
/// password printed once.
#[test]
fn serve_without_config_starts_a_development_node() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut child = Command::new(bin())
            .arg("serve")
            .current_dir(dir.path())
            .env_remove("POSTERN_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = Vec::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        loop {
            let mut l = String::new();
            if reader.read_line(&mut l).unwrap() == 0 {
                break;
            }
            let done = l.starts_with("postern ready");
            lines.push(l);
            if done {
                break;
            }
        }
        (child, lines.concat())
    };
    if std::path::Path::new("/etc/postern/postern.toml").exists() {
        eprintln!("/etc/postern/postern.toml exists on this machine; the development default does not apply");
        return;
    }
    let (mut child, out) = start();
    assert!(out.contains("listening smtp 127.0.0.1:2525"), "{out}");
    assert!(out.contains("listening imap 127.0.0.1:1143"));
    assert!(out.contains("listening submission 127.0.0.1:2587"), "{out}");
    assert!(out.contains("listening imaps 127.0.0.1:1993"));
    let password = out
        .lines()
        .find(|l| l.starts_with("user dev@localhost password "))
        .expect("password printed")
        .split(' ')
        .nth(3)
        .unwrap()
        .to_string();
    // The printed password works (IMAPS with the generated self-signed certificate).
    let script = format!(
        "import imaplib, ssl\nc = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\n\
         m = imaplib.IMAP4_SSL('127.0.0.1', 1993, ssl_context=c); print(m.login('dev@localhost', {password:?})[0])"
    );
    let py = Command::new("python3").arg("-c").arg(script).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "OK", "{}", String::from_utf8_lossy(&py.stderr));
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (mut child, out) = start();
    assert!(!out.contains(&password), "the password is shown only once");
    assert!(out.contains("user dev@localhost (its password was printed at first start"));
    child.kill().unwrap();
    child.wait().unwrap();
    let key_mode = std::fs::metadata(dir.path().join("postern-data/tls/self-signed.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
}
