//! `config.example.toml` is what operators install as `/etc/postern/postern.toml`, and
//! `docs/configuration.md` is its reference. These tests keep the three honest: the example
//! loads with the real binary once its certificate paths point at real files, the keys shown only
//! as comments still load when uncommented, and every key the example sets is documented.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLE: &str = include_str!("../config.example.toml");
const REFERENCE: &str = include_str!("../docs/configuration.md");

/// Certificate paths in the example, each replaced by a generated file (the loader insists that
/// certificate files exist and are readable).
const CERT_PATHS: [&str; 2] = ["/etc/postern/tls/fullchain.pem", "/etc/postern/tls/mail/fullchain.pem"];
const KEY_PATHS: [&str; 2] = ["/etc/postern/tls/privkey.pem", "/etc/postern/tls/mail/privkey.pem"];

/// Writes `text` as `postern.toml` in `dir`, with every certificate path of the example pointing
/// at a freshly generated self-signed certificate, and returns the file's path.
fn install(dir: &Path, text: &str) -> PathBuf {
    let generated =
        rcgen::generate_simple_self_signed(vec!["mail.example.org".to_string()]).expect("generating a certificate");
    let cert = dir.join("fullchain.pem");
    let key = dir.join("privkey.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    assert!(text.contains(CERT_PATHS[0]) && text.contains(KEY_PATHS[0]), "the example's [tls] paths changed");
    let mut text = text.to_string();
    for path in CERT_PATHS {
        text = text.replace(path, cert.to_str().unwrap());
    }
    for path in KEY_PATHS {
        text = text.replace(path, key.to_str().unwrap());
    }
    // Any existing PEM file will do as the ACME directory's CA and the outbound trust.
    text = text.replace("/etc/postern/acme-ca.pem", cert.to_str().unwrap());
    text = text.replace("/etc/postern/outbound-ca.pem", cert.to_str().unwrap());
    let relay_pass = dir.join("relay.pass");
    std::fs::write(&relay_pass, "relay-secret\n").unwrap();
    text = text.replace("/etc/postern/relay.pass", relay_pass.to_str().unwrap());
    text = text.replace("/etc/postern/srs.secret", relay_pass.to_str().unwrap());
    let cluster_key = dir.join("cluster.key");
    std::fs::write(&cluster_key, "an example cluster secret of 40 characters\n").unwrap();
    text = text.replace("/etc/postern/cluster.key", cluster_key.to_str().unwrap());
    let dkim = dir.join("dkim.key");
    std::fs::write(&dkim, rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem()).unwrap();
    text = text.replace("/etc/postern/dkim/example.org-2026a.key", dkim.to_str().unwrap());
    let config = dir.join("postern.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn postern(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postern"));
    command.args(args).env_remove("POSTERN_CONFIG").env_remove("POSTERN_LOG");
    command
}

/// Runs the command and returns its stdout, failing with everything it printed unless it exited 0.
fn succeed(command: &mut Command) -> String {
    let Output { status, stdout, stderr } = command.output().expect("running postern");
    let (stdout, stderr) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    assert!(status.success(), "{command:?} exited with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.is_empty(), "{command:?} wrote to stderr:\n{stderr}");
    stdout.into_owned()
}

#[test]
fn example_passes_check_config_once_certificates_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = install(dir.path(), EXAMPLE);
    let config = config.to_str().unwrap();

    let by_option = succeed(&mut postern(&["check-config", "--config", config]));
    for expected in [
        "node        mail (primary)\n",
        "hostname    mail.example.org\n",
        "domains     example.org, example.net\n",
        "listen      smtp        0.0.0.0:25\n",
        "  alice@example.org\n",
        "  postmaster@example.org -> alice@example.org\n",
        &format!("tls         cert={}", dir.path().join("fullchain.pem").display()),
        &format!("{config}: OK\n"),
    ] {
        assert!(by_option.contains(expected), "check-config output lacks {expected:?}:\n{by_option}");
    }

    // The same file found through the environment, with the node named explicitly.
    let by_env = succeed(postern(&["check-config", "--node", "mail"]).env("POSTERN_CONFIG", config));
    assert_eq!(by_env, by_option);
}

/// Lines such as `# listen.sync = ["0.0.0.0:7890"]` or `# [acme]`: examples an operator may
/// uncomment. Prose comments never have a bare key directly before ` = `.
fn uncommented(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("# ")?;
    let header = rest.trim_end();
    if header.starts_with('[') && header.ends_with(']') && !header.contains(' ') {
        return Some(rest);
    }
    let (key, _) = rest.split_once(" = ")?;
    let key_chars = |c: char| c.is_ascii_alphanumeric() || "_.-\"@+".contains(c);
    (!key.is_empty() && key.chars().all(key_chars)).then_some(rest)
}

#[test]
fn commented_out_examples_load_when_uncommented() {
    let mut count = 0;
    let text: String = EXAMPLE
        .lines()
        .map(|line| match uncommented(line) {
            Some(rest) => {
                count += 1;
                format!("{rest}\n")
            }
            None => format!("{line}\n"),
        })
        .collect();
    assert!(count >= 20, "only {count} commented-out example lines found; did the comment style change?");
    let dir = tempfile::tempdir().unwrap();
    let config = install(dir.path(), &text);
    let config = config.to_str().unwrap();

    // Two nodes now: the machine's host name decides nothing here, `--node` does.
    let mail = succeed(&mut postern(&["check-config", "-c", config, "-n", "mail"]));
    assert!(mail.contains("node        mail (primary)\n"), "{mail}");
    assert!(mail.contains("listen      metrics     127.0.0.1:9425\n"), "{mail}");
    assert!(mail.contains(&format!("{config}: OK\n")), "{mail}");
    let backup = succeed(&mut postern(&["check-config", "-c", config, "-n", "mx2"]));
    assert!(backup.contains("node        mx2 (backup)\n"), "{backup}");
}

/// The key of a `key = value` line that is not a comment: `max_errors`, `listen.smtp`, or the
/// text of a quoted key (`postmaster@example.org`).
fn key_of(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
        return None;
    }
    if let Some(quoted) = line.strip_prefix('"') {
        let (key, rest) = quoted.split_once('"')?;
        return rest.trim_start().starts_with('=').then_some(key);
    }
    let (key, _) = line.split_once('=')?;
    Some(key.trim())
}

#[test]
fn every_example_key_is_documented() {
    let mut checked = 0;
    let mut missing = Vec::new();
    for (index, line) in EXAMPLE.lines().enumerate() {
        let header = line.trim().strip_prefix('[').map(|h| h.trim_start_matches('['));
        if let Some(header) = header {
            // `[users."alice@example.org"]` must be documented as a table, not as that user.
            let table = header.split(['.', ']']).next().unwrap_or_default();
            if !REFERENCE.contains(&format!("`[{table}")) {
                missing.push(format!("line {}: table [{table}]", index + 1));
            }
            continue;
        }
        let Some(key) = key_of(line) else {
            continue;
        };
        checked += 1;
        // Bare keys must appear as code (`max_errors`); quoted keys (alias sources) as written.
        let documented = if line.trim_start().starts_with('"') {
            REFERENCE.contains(key)
        } else {
            REFERENCE.contains(&format!("`{key}`"))
        };
        if !documented {
            missing.push(format!("line {}: {key}", index + 1));
        }
    }
    assert!(checked >= 25, "only {checked} keys found in config.example.toml; is the parser broken?");
    assert!(
        missing.is_empty(),
        "config.example.toml has keys that docs/configuration.md does not mention:\n{}",
        missing.join("\n")
    );
}
