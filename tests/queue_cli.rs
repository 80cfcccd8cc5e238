//! `postern queue ...` against a running node through its control socket.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const DEFERRED: &str = "[aliases]\n\"fwd@example.test\" = \"someone@elsewhere.example\"\n[outbound]\n\
                        relay = \"smtp://127.0.0.1:9\"\nretry_initial = \"1h\"\nretry_max = \"1h\"\n";

fn start() -> Node {
    Node::start(Setup { extra: DEFERRED.into(), ..Setup::default() })
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn queue_as(node: &Node, prefix: &[&str], args: &[&str]) -> Out {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let out =
        cmd.arg("queue").args(args).arg("--config").arg(&node.config).env_remove("POSTERN_CONFIG").output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn queue(node: &Node, args: &[&str]) -> Out {
    queue_as(node, &[], args)
}

fn ok(node: &Node, args: &[&str]) -> String {
    let o = queue(node, args);
    assert_eq!(o.code, 0, "queue {args:?}: {}{}\nlog:\n{}", o.stdout, o.stderr, node.log());
    o.stdout
}

/// The entry lines of `queue list` split in columns (the header checked and dropped).
fn list(node: &Node) -> Vec<Vec<String>> {
    let text = ok(node, &["list"]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["ID", "SENDER", "RECIPIENTS", "SIZE", "AGE", "ATTEMPTS", "NEXT", "LAST-ERROR"]);
    lines
        .map(|l| {
            let mut cols: Vec<String> = l.split_whitespace().map(String::from).collect();
            let error = cols.split_off(7).join(" ");
            cols.push(error);
            cols
        })
        .collect()
}

fn socket(node: &Node) -> std::path::PathBuf {
    node.data_dir().join("control.sock")
}

/// Sends raw bytes to the control socket and returns the answer's lines.
fn raw(node: &Node, data: &[u8]) -> Vec<serde_json::Value> {
    let mut s = UnixStream::connect(socket(node)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    BufReader::new(s).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
}

#[test]
fn queue_commands_manage_deferred_mail() {
    let mut node = start();
    let sock = socket(&node);
    let meta = std::fs::symlink_metadata(&sock).expect("control socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    assert!(list(&node).is_empty());
    let (code, text) =
        send_message(&node, "sender@remote.example", &["fwd@example.test"], &message("m1", "fwd@example.test"));
    assert_eq!(code, 250, "{text}");
    // After the first (failed) attempt: attempts 1, the relay's address in the last error
    // ("127.0.0.1[127.0.0.1]: connect failed: Connection refused").
    let mut rows = Vec::new();
    wait_for("a failed attempt", Duration::from_secs(20), || {
        rows = list(&node);
        rows.len() == 1 && rows[0][5] == "1" && rows[0][7].contains("127.0.0.1") && rows[0][7].contains("refused")
    });
    let row = rows[0].clone();
    let id = row[0].clone();
    assert_eq!(id.len(), 16);
    assert_eq!(row[1], "sender@remote.example");
    assert_eq!(row[2], "someone@elsewhere.example");
    assert!(row[3].parse::<u64>().unwrap() > 100);
    assert!(row[4].ends_with('s') || row[4].ends_with('m'), "{row:?}");
    assert!(row[6] == "in1h" || row[6] == "in59m", "next try in about an hour: {row:?}");

    let show = ok(&node, &["show", &id]);
    for needle in [
        format!("id: {id}"),
        "sender: <sender@remote.example>".to_string(),
        "attempts: 1".into(),
        "held: no".into(),
        "recipient: <someone@elsewhere.example>".into(),
        "  original: <fwd@example.test>".into(),
    ] {
        assert!(show.contains(&needle), "{needle:?} in:\n{show}");
    }
    let recipient_error =
        show.lines().skip_while(|l| !l.starts_with("recipient:")).find(|l| l.starts_with("  last-error:"));
    assert!(recipient_error.is_some_and(|l| l.contains("127.0.0.1")), "{show}");
    // Leading zeros may be left out.
    assert!(ok(&node, &["show", id.trim_start_matches('0')]).contains(&format!("id: {id}")));

    // hold / release
    assert_eq!(ok(&node, &["hold", &id]), format!("{id} held\n"));
    assert_eq!(list(&node)[0][6], "held");
    assert_eq!(ok(&node, &["retry", &id]), format!("{id} is held: `postern queue release {id}` delivers it\n"));
    assert_eq!(list(&node)[0][6], "held");
    assert!(ok(&node, &["show", &id]).contains("held: yes"));
    assert_eq!(ok(&node, &["release", &id]), format!("{id} released\n"));
    // Released: due now, so it is tried again at once.
    wait_for("a second attempt", Duration::from_secs(20), || list(&node)[0][5] == "2");
    assert_ne!(list(&node)[0][6], "held");

    // retry ID, retry all, flush
    assert_eq!(ok(&node, &["retry", &id]), format!("{id} scheduled for delivery now\n"));
    wait_for("a third attempt", Duration::from_secs(20), || list(&node)[0][5] == "3");
    assert!(ok(&node, &["retry", "all"]).ends_with("scheduled for delivery now\n"));
    assert_eq!(ok(&node, &["flush"]).lines().count(), 1);
    wait_for("more attempts", Duration::from_secs(20), || list(&node)[0][5].parse::<u32>().unwrap() >= 4);

    // unknown and malformed ids
    for bad in ["ffffffffffff0000", "not-an-id"] {
        for args in
            [vec!["show", bad], vec!["retry", bad], vec!["hold", bad], vec!["release", bad], vec!["remove", bad]]
        {
            let o = queue(&node, &args);
            assert_eq!(o.code, 1, "{args:?}: {}", o.stdout);
            assert!(o.stderr.contains("no queue entry") || o.stderr.contains("bad queue id"), "{}", o.stderr);
        }
    }

    // Malformed request lines get an error answer, and the server goes on.
    for junk in
        [&b"not json\n"[..], b"{\"cmd\":\"queue_explode\"}\n", b"\n", b"{\"cmd\":\"queue_show\",\"id\":\"\\u0000\"}\n"]
    {
        let answer = raw(&node, junk);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(answer[0]["ok"], false);
        assert_eq!(answer[0]["kind"], "bad_request", "{answer:?}");
    }
    let answer = raw(&node, &vec![b'x'; 200_000]);
    assert_eq!(answer[0]["ok"], false);
    assert!(answer[0]["error"].as_str().unwrap().contains("longer than"), "{answer:?}");
    let answer = raw(&node, b"{\"cmd\":\"queue_list\"}\n");
    assert_eq!(answer.len(), 2, "one entry line and the summary: {answer:?}");
    assert_eq!(answer[0]["entry"]["id"], id.as_str());
    assert_eq!(answer[1]["ok"], true);
    assert_eq!(answer[1]["count"], 1);

    // remove --bounce: the entry goes, and the bounce to the remote sender is queued in turn.
    assert_eq!(ok(&node, &["remove", &id, "--bounce"]), format!("{id} removed; a bounce is queued for the sender\n"));
    let rows = list(&node);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_ne!(rows[0][0], id);
    assert_eq!(rows[0][1], "<>");
    assert_eq!(rows[0][2], "sender@remote.example");
    let bounce = rows[0][0].clone();
    assert!(ok(&node, &["show", &bounce]).contains("sender: <>"));
    // remove without bounce: gone, nothing new.
    assert_eq!(ok(&node, &["remove", &bounce]), format!("{bounce} removed\n"));
    assert!(list(&node).is_empty());
    assert_eq!(queue(&node, &["show", &id]).code, 1);
    assert!(node.is_running());

    // A node killed outright leaves its socket behind: "not running", and the next start
    // replaces the stale socket.
    node.kill9();
    assert!(sock.exists());
    let o = queue(&node, &["list"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("node test is not running"), "{}", o.stderr);
    node.launch();
    assert!(list(&node).is_empty());

    // A clean stop removes the socket.
    node.stop();
    assert!(!sock.exists());
    for args in [vec!["list"], vec!["flush"], vec!["show", "1"]] {
        let o = queue(&node, &args);
        assert_eq!(o.code, 1);
        assert!(o.stderr.contains("node test is not running (no control socket at"), "{}", o.stderr);
        assert!(o.stdout.lines().count() <= 1, "at most the list header: {}", o.stdout);
    }
}

/// The socket checks its peer's uid: root and the server's user only.
#[test]
fn other_users_are_refused() {
    let tool: &[&str] = if Path::new("/usr/bin/setpriv").exists() || Path::new("/bin/setpriv").exists() {
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    } else {
        eprintln!("setpriv not found: skipping");
        return;
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot switch user, skipping");
        return;
    }
    let node = start();
    // Let uid 65534 reach the config and the socket through the file system, so that only the
    // server's own check stands in the way.
    for dir in [node.dir.path().to_path_buf(), node.data_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&node.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let probe = Command::new("setpriv").args(&tool[1..]).arg(bin()).arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("uid 65534 cannot run {}: skipping", bin());
        return;
    }
    // Mode 0600: the kernel refuses the connection.
    let o = queue_as(&node, tool, &["list"]);
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stderr.contains("permission denied"), "{}", o.stderr);
    // Even with the socket opened up, the server refuses the uid.
    std::fs::set_permissions(socket(&node), std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [vec!["list"], vec!["flush"]] {
        let o = queue_as(&node, tool, &args);
        assert_eq!(o.code, 1, "{}", o.stdout);
        assert!(o.stderr.contains("uid 65534 is neither root nor the server's user"), "{}", o.stderr);
    }
    // Root still gets in.
    assert!(ok(&node, &["list"]).starts_with("ID "));
}

/// A file in the socket's place that is not a socket stops the start with a clear message.
#[test]
fn a_non_socket_in_the_way_is_a_startup_error() {
    let mut node = start();
    let sock = socket(&node);
    node.kill9();
    let _ = std::fs::remove_file(&sock);
    std::fs::write(&sock, "not a socket").unwrap();
    let out = Command::new(bin()).args(["serve", "--config"]).arg(&node.config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control socket") && stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

/// More entries than one page of the server's store reads: all listed, in id order, once.
#[test]
fn list_pages_through_a_long_queue() {
    let node = start();
    let mut d = smtp(&node);
    let n = 300; // the server reads 256 entries a time
    for i in 0..n {
        d.cmd("MAIL FROM:<sender@remote.example>", 250);
        d.cmd("RCPT TO:<fwd@example.test>", 250);
        d.cmd("DATA", 354);
        d.send_raw(message(&format!("p{i}"), "fwd@example.test").as_bytes());
        d.send_raw(b".\r\n");
        assert_eq!(d.reply().0, 250);
    }
    d.send("QUIT");
    let text = ok(&node, &["list"]);
    let ids: Vec<u64> = text.lines().skip(1).map(|l| u64::from_str_radix(&l[..16], 16).unwrap()).collect();
    assert_eq!(ids.len(), n);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending and unique");
    let answer = raw(&node, b"{\"cmd\":\"queue_list\"}\n");
    assert_eq!(answer.len(), n + 1);
    assert_eq!(answer[n]["count"], n);
    assert_eq!(ok(&node, &["flush"]), format!("{n} messages scheduled for delivery now\n"));
}
