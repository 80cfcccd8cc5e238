//! Real IMAP clients nobody here wrote, against the real binary: mbsync and offlineimap sync a
//! Maildir both ways (and a second run finds nothing to do), mutt reads and files mail in batch
//! mode, and imapclient drives every extension the server advertises. The test command installs
//! them all (scripts/test.sh).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ALICE: &str = "alice@example.test";

/// A message with LF line ends as a Maildir holds it; `id` makes its Message-ID `<id@peer.test>`.
fn lf_message(id: &str) -> String {
    format!(
        "From: Sender <sender@peer.test>\nTo: {ALICE}\nSubject: client test {id}\nMessage-ID: <{id}@peer.test>\n\
         Date: Sat, 21 Nov 2026 10:00:00 +0000\n\nHello {id}.\nSecond line of {id}.\n"
    )
}

/// Delivers `ids` to alice over SMTP, in order (so UIDs follow it).
fn deliver(node: &Node, ids: &[String]) {
    for id in ids {
        let msg = lf_message(id).replace('\n', "\r\n");
        assert_eq!(send_message(node, "sender@peer.test", &[ALICE], &msg).0, 250);
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

/// Runs a client with its output in a file, killed after `secs`: a hung client fails the test
/// instead of hanging it. Returns stdout and stderr together; panics when it fails.
fn run(node: &Node, cmd: &mut Command, secs: u64) -> String {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (the test command installs it)"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = fs::read_to_string(log.path()).unwrap_or_default();
    match status {
        Some(s) if s.success() => out,
        Some(s) => panic!("{cmd:?} failed ({s}):\n{out}\nserver log:\n{}", node.log()),
        None => panic!("{cmd:?} hung for {secs} s:\n{out}\nserver log:\n{}", node.log()),
    }
}

/// Every mailbox of `user` as the server sees it: `{name: {uidvalidity, uidnext, highestmodseq (when
/// the server has CONDSTORE), msgs: {Message-ID: [uid, [flags]]}}}`, read with imaplib (EXAMINE, so
/// reading changes nothing).
fn server_state(node: &Node, user: &str) -> Value {
    let out = python_imap(
        node,
        &format!(
            r#"
import re
m = login({user:?})
condstore = 'CONDSTORE' in m.capabilities
if condstore:
    assert m.enable('CONDSTORE')[0] == 'OK'
state = {{}}
for line in m.list()[1]:
    name = re.match(rb'\(.*?\) (?:"."|NIL) (.*)$', line).group(1).decode()
    if name.startswith('"'):
        name = name[1:-1]
    typ, data = m.select('"%s"' % name, readonly=True)
    assert typ == 'OK', (name, data)
    exists = int(data[0])
    box = {{'uidvalidity': int(m.response('UIDVALIDITY')[1][0]), 'uidnext': int(m.response('UIDNEXT')[1][0]), 'msgs': {{}}}}
    # RFC 7162 §3.1.2.1: with CONDSTORE enabled every EXAMINE reports HIGHESTMODSEQ; any write moves it.
    hms = m.response('HIGHESTMODSEQ')[1][0]
    assert hms is not None or not condstore, (name, 'no HIGHESTMODSEQ')
    if hms is not None:
        box['highestmodseq'] = int(hms)
    if exists:
        typ, data = m.uid('FETCH', '1:*', '(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])')
        for d in data:
            if not isinstance(d, tuple):
                continue
            uid = int(re.search(rb'UID (\d+)', d[0]).group(1))
            flags = sorted(f.decode() for f in re.search(rb'FLAGS \((.*?)\)', d[0]).group(1).split() if f != b'\\Recent')
            mid = d[1].decode().split(':', 1)[1].strip()
            box['msgs'][mid] = [uid, flags]
        assert len(box['msgs']) == exists, (name, data)
    state[name] = box
print(json.dumps(state))
"#
        ),
    );
    serde_json::from_str(&out).unwrap()
}

/// The flags of message `<id@peer.test>` in `mailbox`, or None when it is not there.
fn server_flags(state: &Value, mailbox: &str, id: &str) -> Option<Vec<String>> {
    let m = state[mailbox]["msgs"].get(format!("<{id}@peer.test>"))?;
    Some(m[1].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect())
}

/// The raw bytes of the message with `message_id` in `mailbox` (BODY.PEEK[]).
fn server_message(node: &Node, mailbox: &str, message_id: &str) -> Vec<u8> {
    let out = python_imap(
        node,
        &format!(
            "m = login({ALICE:?})\nm.select({mailbox:?}, readonly=True)\n\
             typ, data = m.uid('SEARCH', 'HEADER', 'Message-ID', {message_id:?})\nuids = data[0].split()\n\
             assert len(uids) == 1, data\ntyp, data = m.uid('FETCH', uids[0], '(BODY.PEEK[])')\nprint(data[0][1].hex())\n"
        ),
    );
    let h = out.trim();
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect()
}

/// Flags on the server, set with imaplib: `(message number, flags)` in INBOX.
fn set_server_flags(node: &Node, stores: &[(usize, &str)]) {
    let mut script = format!("m = login({ALICE:?})\nm.select('INBOX')\n");
    for (n, flags) in stores {
        script.push_str(&format!("assert m.store('{n}', '+FLAGS', {flags:?})[0] == 'OK'\n"));
    }
    python_imap(node, &script);
}

/// The bare id (`c07`) of a Maildir message file.
fn file_id(path: &Path) -> String {
    maildir_message_id(path).split('@').next().unwrap().to_string()
}

/// The Maildir flag letters of a message file (`:2,FS` -> "FS").
fn file_flags(path: &Path) -> String {
    let name = path.file_name().unwrap().to_str().unwrap();
    name.split_once(":2,").map(|(_, f)| f.to_string()).unwrap_or_default()
}

/// The file of message `id` in a Maildir folder.
fn find_file(folder: &Path, id: &str) -> PathBuf {
    maildir_files(folder)
        .into_iter()
        .find(|p| file_id(p) == id)
        .unwrap_or_else(|| panic!("{id} not in {}", folder.display()))
}

/// Gives a message file new flags the way a mail reader does: into cur/, `:2,` and the letters
/// in ASCII order (Maildir requires it).
fn set_file_flags(path: &Path, flags: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let base = name.split_once(":2,").map(|(b, _)| b).unwrap_or(name);
    let mut letters: Vec<char> = flags.chars().collect();
    letters.sort();
    let new = path
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("cur")
        .join(format!("{base}:2,{}", letters.into_iter().collect::<String>()));
    fs::rename(path, new).unwrap();
}

/// A message a mail reader wrote into a Maildir folder (creating the folder).
fn add_local_message(folder: &Path, name: &str, text: &str) {
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(folder.join(sub)).unwrap();
    }
    fs::write(folder.join("tmp").join(name), text).unwrap();
    fs::rename(folder.join("tmp").join(name), folder.join("new").join(name)).unwrap();
}

/// Every message file under a Maildir root with its flags: what a sync must leave alone when
/// nothing changed.
fn listing(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.parent().unwrap().file_name().and_then(|n| n.to_str()), Some("cur" | "new" | "tmp")) {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

/// A pulled Maildir file compared with what SMTP delivered: the client wrote LF line ends and
/// may have added its own header (mbsync's X-TUID); the server prepended trace headers.
fn assert_pulled(path: &Path, id: &str) {
    let text = fs::read_to_string(path).unwrap();
    let crlf: String = text.lines().filter(|l| !l.starts_with("X-TUID: ")).map(|l| format!("{l}\r\n")).collect();
    assert_eq!(
        String::from_utf8(strip_trace(crlf.as_bytes())).unwrap(),
        lf_message(id).replace('\n', "\r\n"),
        "{}",
        path.display()
    );
}

// --- mbsync ---------------------------------------------------------------------------------

fn mbsync(node: &Node, rc: &Path) -> String {
    // -Dn logs the IMAP dialogue: the second run is checked for commands that change anything.
    run(node, Command::new("mbsync").arg("-Dn").arg("-c").arg(rc).arg("-a"), 30)
}

/// The IMAP commands of an mbsync -Dn log that change the server.
fn mbsync_writes(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix(">>> "))
        .filter(|l| {
            let cmd: Vec<&str> = l.split(' ').skip(1).take(2).collect();
            let verb = if cmd.first() == Some(&"UID") { cmd.get(1) } else { cmd.first() };
            matches!(
                verb.map(|v| v.to_ascii_uppercase()).as_deref(),
                Some("APPEND" | "STORE" | "EXPUNGE" | "COPY" | "MOVE" | "CREATE" | "DELETE" | "RENAME")
            )
        })
        .map(str::to_string)
        .collect()
}

/// Runs mbsync once more and asserts it found nothing to do: no writing command on the server,
/// the Maildir and the server state as they were.
fn assert_mbsync_idempotent(node: &Node, rc: &Path, maildir: &Path) {
    let files = listing(maildir);
    let state = server_state(node, ALICE);
    let log = mbsync(node, rc);
    assert_eq!(mbsync_writes(&log), Vec::<String>::new(), "a run with nothing to sync wrote:\n{log}");
    assert_eq!(listing(maildir), files, "a run with nothing to sync changed the Maildir:\n{log}");
    assert_eq!(server_state(node, ALICE), state, "a run with nothing to sync changed the server:\n{log}");
}

#[test]
fn mbsync_syncs_both_ways_and_a_second_run_changes_nothing() {
    let node = Node::start(Setup::default());
    let ids = ids("c", 20);
    deliver(&node, &ids);
    // Flags set on the server: c00-c03 seen, c04-c05 flagged, c06 seen and answered, c07 draft.
    set_server_flags(&node, &[(1, "(\\Seen)"), (2, "(\\Seen)"), (3, "(\\Seen)"), (4, "(\\Seen)")]);
    set_server_flags(&node, &[(5, "(\\Flagged)"), (6, "(\\Flagged)"), (7, "(\\Seen \\Answered)"), (8, "(\\Draft)")]);
    // A mailbox made on the server, with one message.
    python_imap(
        &node,
        &format!(
            "m = login({ALICE:?})\nassert m.create('FromServer')[0] == 'OK'\n\
             assert m.append('FromServer', '(\\\\Flagged)', None, {:?}.encode())[0] == 'OK'\n",
            lf_message("srv").replace('\n', "\r\n")
        ),
    );

    let home = node.dir.path().join("mbsync");
    let maildir = home.join("Mail");
    fs::create_dir_all(&maildir).unwrap();
    let rc = home.join("mbsyncrc");
    fs::write(
        &rc,
        format!(
            "IMAPAccount test\nHost 127.0.0.1\nPort {}\nUser {ALICE}\nPass {PASSWORD}\nSSLType IMAPS\n\
             CertificateFile {}\n\nIMAPStore remote\nAccount test\n\nMaildirStore local\nPath {}/\nInbox {}/INBOX\n\
             SubFolders Verbatim\n\nChannel test\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n\
             Expunge Both\nSync All\nSyncState *\n",
            node.imaps.port(),
            node.cert.display(),
            maildir.display(),
            maildir.display()
        ),
    )
    .unwrap();

    // Pull. mbsync (built with zlib) compresses the session when the server offers it (RFC 4978).
    let log = mbsync(&node, &rc);
    let caps = log.lines().find(|l| l.contains("CAPABILITY IMAP4rev1")).expect("mbsync logs the greeting");
    if caps.contains(" COMPRESS=DEFLATE") {
        assert!(log.lines().any(|l| l.starts_with(">>> ") && l.ends_with(" COMPRESS DEFLATE")), "{log}");
    }
    let inbox = maildir.join("INBOX");
    let files = maildir_files(&inbox);
    assert_eq!(files.len(), 20, "{files:?}");
    for f in &files {
        let id = file_id(f);
        let want = match id.as_str() {
            "c00" | "c01" | "c02" | "c03" => "S",
            "c04" | "c05" => "F",
            "c06" => "RS",
            "c07" => "D",
            _ => "",
        };
        assert_eq!(file_flags(f), want, "{}", f.display());
        assert_pulled(f, &id);
    }
    // Every server mailbox exists locally, the one made on the server with its message.
    for b in ["Archive", "Drafts", "Junk", "Sent", "Trash", "FromServer"] {
        assert!(maildir.join(b).join("cur").is_dir(), "{b} not pulled");
    }
    let srv = maildir_files(&maildir.join("FromServer"));
    assert_eq!(srv.len(), 1);
    assert_eq!(file_flags(&srv[0]), "F");
    assert_pulled(&srv[0], "srv");
    assert_mbsync_idempotent(&node, &rc, &maildir);

    // Local changes: flags added and removed, one trashed (T: \Deleted, then expunged), one file
    // deleted, a new message, a new folder. And on the server meanwhile: a flag and a delivery.
    set_file_flags(&find_file(&inbox, "c10"), "S");
    set_file_flags(&find_file(&inbox, "c11"), "FS");
    set_file_flags(&find_file(&inbox, "c00"), "");
    set_file_flags(&find_file(&inbox, "c12"), "T");
    fs::remove_file(find_file(&inbox, "c13")).unwrap();
    let local_new = lf_message("local-new").replace("Hello", "Written locally,\twith a tab and trailing space \n");
    add_local_message(&inbox, "1795000000.local1.client", &local_new);
    // A big one in the new folder: 1 MB of lines goes up as one APPEND literal.
    let big: String =
        lf_message("local-box") + &(0..16_000).map(|i| format!("{i:08} {}\n", "x".repeat(56))).collect::<String>();
    add_local_message(&maildir.join("FromLocal"), "1795000000.local2.client", &big);
    set_server_flags(&node, &[(16, "(\\Flagged)")]);
    deliver(&node, &["c20".to_string()]);

    let log = mbsync(&node, &rc);
    let state = server_state(&node, ALICE);
    let flags = |id: &str| server_flags(&state, "INBOX", id);
    assert_eq!(flags("c10").unwrap(), ["\\Seen"], "{log}");
    assert_eq!(flags("c11").unwrap(), ["\\Flagged", "\\Seen"]);
    assert_eq!(flags("c00").unwrap(), Vec::<String>::new());
    assert_eq!(flags("c01").unwrap(), ["\\Seen"]);
    assert_eq!(flags("c06").unwrap(), ["\\Answered", "\\Seen"]);
    assert_eq!(flags("c12"), None, "the trashed message is expunged on the server:\n{log}");
    assert_eq!(flags("c13"), None, "the deleted file is expunged on the server:\n{log}");
    assert_eq!(state["INBOX"]["msgs"].as_object().unwrap().len(), 20, "20 - 2 + the local one + c20");
    // The local message arrived byte for byte (CRLF on the wire; mbsync may add X-TUID).
    let got = server_message(&node, "INBOX", "<local-new@peer.test>");
    let got: String =
        String::from_utf8(got).unwrap().split_inclusive("\r\n").filter(|l| !l.starts_with("X-TUID: ")).collect();
    assert_eq!(got, local_new.replace('\n', "\r\n"));
    // The local folder was created on the server with its message.
    assert_eq!(server_flags(&state, "FromLocal", "local-box"), Some(vec![]), "{log}");
    assert_eq!(
        String::from_utf8(server_message(&node, "FromLocal", "<local-box@peer.test>"))
            .unwrap()
            .split_inclusive("\r\n")
            .filter(|l| !l.starts_with("X-TUID: "))
            .collect::<String>(),
        big.replace('\n', "\r\n")
    );
    // And the server's changes came down in the same run.
    assert_eq!(file_flags(&find_file(&inbox, "c15")), "F");
    assert_pulled(&find_file(&inbox, "c20"), "c20");
    assert_eq!(maildir_files(&inbox).len(), 20, "c12 expunged locally too");

    assert_mbsync_idempotent(&node, &rc, &maildir);
}

// --- offlineimap ----------------------------------------------------------------------------

fn offlineimap(node: &Node, rc: &Path) -> String {
    let out = run(node, Command::new("offlineimap").arg("-c").arg(rc).arg("-o").arg("-u").arg("basic"), 40);
    assert!(!out.contains("ERROR") && !out.contains("WARNING"), "offlineimap complained:\n{out}");
    out
}

#[test]
fn offlineimap_syncs_both_ways_and_a_second_run_changes_nothing() {
    let node = Node::start(Setup::default());
    let ids = ids("o", 6);
    deliver(&node, &ids);
    set_server_flags(&node, &[(1, "(\\Seen)"), (2, "(\\Flagged \\Answered)")]);
    let home = node.dir.path().join("offlineimap");
    let maildir = home.join("Mail");
    let rc = home.join("offlineimaprc");
    fs::create_dir_all(&home).unwrap();
    // localhost, not 127.0.0.1: offlineimap's own host check reads DNS names only, not IP addresses.
    fs::write(
        &rc,
        format!(
            "[general]\naccounts = test\nmetadata = {}\nui = basic\nfsync = false\n\n\
             [Account test]\nlocalrepository = local\nremoterepository = remote\n\n\
             [Repository local]\ntype = Maildir\nlocalfolders = {}\n\n\
             [Repository remote]\ntype = IMAP\nremotehost = localhost\nremoteport = {}\nremoteuser = {ALICE}\n\
             remotepass = {PASSWORD}\nssl = yes\nsslcacertfile = {}\nusecompression = yes\n",
            home.join("meta").display(),
            maildir.display(),
            node.imaps.port(),
            node.cert.display()
        ),
    )
    .unwrap();

    offlineimap(&node, &rc);
    let inbox = maildir.join("INBOX");
    let files = maildir_files(&inbox);
    assert_eq!(files.len(), 6, "{files:?}");
    for f in &files {
        let id = file_id(f);
        let want = match id.as_str() {
            "o00" => "S",
            "o01" => "FR",
            _ => "",
        };
        assert_eq!(file_flags(f), want, "{}", f.display());
        assert_pulled(f, &id);
    }
    for b in ["Archive", "Drafts", "Junk", "Sent", "Trash"] {
        assert!(maildir.join(b).join("cur").is_dir(), "{b} not pulled");
    }

    // Local changes: flags, a deletion, a new message, a new folder. On the server meanwhile: o04
    // answered, o05 expunged.
    set_file_flags(&find_file(&inbox, "o00"), "");
    set_file_flags(&find_file(&inbox, "o02"), "FS");
    fs::remove_file(find_file(&inbox, "o03")).unwrap();
    add_local_message(&inbox, "1795000000.local1.client", &lf_message("oi-new"));
    add_local_message(&maildir.join("OffLocal"), "1795000000.local2.client", &lf_message("oi-box"));
    python_imap(
        &node,
        &format!(
            "m = login({ALICE:?})\nm.select('INBOX')\nm.store('5', '+FLAGS', '(\\\\Answered)')\n\
             m.store('6', '+FLAGS', '(\\\\Deleted)')\nassert m.expunge()[1] == [b'6']\n"
        ),
    );
    let log = offlineimap(&node, &rc);
    assert_eq!(file_flags(&find_file(&inbox, "o04")), "R", "{log}");
    assert!(
        maildir_files(&inbox).iter().all(|f| file_id(f) != "o05"),
        "o05 expunged on the server stays locally:\n{log}"
    );
    let state = server_state(&node, ALICE);
    let flags = |id: &str| server_flags(&state, "INBOX", id);
    assert_eq!(flags("o00").unwrap(), Vec::<String>::new(), "{log}");
    assert_eq!(flags("o01").unwrap(), ["\\Answered", "\\Flagged"]);
    assert_eq!(flags("o02").unwrap(), ["\\Flagged", "\\Seen"]);
    assert_eq!(flags("o03"), None, "the deleted file is expunged on the server:\n{log}");
    assert_eq!(flags("oi-new").unwrap(), Vec::<String>::new());
    let got = String::from_utf8(server_message(&node, "INBOX", "<oi-new@peer.test>")).unwrap();
    assert_eq!(got, lf_message("oi-new").replace('\n', "\r\n"), "uploaded byte for byte (UIDPLUS: no header added)");
    assert_eq!(server_flags(&state, "OffLocal", "oi-box"), Some(vec![]), "the local folder is created on the server");

    // A second run: nothing to do.
    let files = listing(&maildir);
    let log = offlineimap(&node, &rc);
    for noise in ["Copy message", "Adding flag", "Deleting flag", "Deleting ", "Creating"] {
        assert!(!log.contains(noise), "a run with nothing to sync did {noise:?}:\n{log}");
    }
    assert_eq!(listing(&maildir), files, "{log}");
    assert_eq!(server_state(&node, ALICE), state, "{log}");
}

// --- mutt -----------------------------------------------------------------------------------

/// Runs mutt on alice's INBOX with keys pushed at start: mutt needs a terminal, so it runs under
/// script(1) on a pseudo-terminal; a stuck prompt is killed by `run`'s timeout. `rc` is appended
/// to the muttrc. With `-d 2` mutt logs its IMAP dialogue to DIR/.muttdebug0 (HOME is DIR).
fn mutt(node: &Node, dir: &Path, rc: &str, keys: &str) -> String {
    let muttrc = dir.join("muttrc");
    fs::write(
        &muttrc,
        format!(
            "set imap_user = \"{ALICE}\"\nset imap_pass = \"{PASSWORD}\"\nset certificate_file = \"{}\"\n\
             set ssl_verify_host = no\nset header_cache = \"\"\nset message_cachedir = \"\"\nset mbox_type = mbox\n\
             set confirmappend = no\nset confirmcreate = no\nset quit = yes\nset move = no\nset delete = yes\n\
             set wait_key = no\nset beep = no\nset mark_old = no\nset folder = \"imaps://127.0.0.1:{}/\"\n{rc}",
            node.cert.display(),
            node.imaps.port()
        ),
    )
    .unwrap();
    let line = format!("mutt -d 2 -n -F '{}' -f '=INBOX' -e 'push \"{keys}\"'", muttrc.display());
    run(node, Command::new("script").args(["-qec", &line, "/dev/null"]).env("TERM", "vt100").env("HOME", dir), 30)
}

/// Keys that tag every message and copy them to a local mbox file.
fn copy_all_to(mbox: &Path) -> String {
    format!("<tag-pattern>~A<enter><tag-prefix><copy-message>{}<enter><quit>", mbox.display())
}

#[test]
fn mutt_reads_copies_and_files_the_inbox_in_batch_mode() {
    let node = Node::start(Setup::default());
    let ids = ids("u", 5);
    deliver(&node, &ids);
    let dir = node.dir.path().join("mutt");
    fs::create_dir_all(&dir).unwrap();
    let mbox = dir.join("saved.mbox");

    // Tag every message and copy them to a local mbox file.
    let screen = mutt(&node, &dir, "", &copy_all_to(&mbox));
    let text = fs::read_to_string(&mbox).unwrap_or_else(|_| panic!("mutt wrote no mbox; screen:\n{screen}"));
    let parts: Vec<&str> = text.split("\nFrom ").collect();
    assert_eq!(parts.len(), 5, "{text}");
    for id in &ids {
        assert!(text.contains(&format!("Subject: client test {id}\n")), "{id} missing:\n{text}");
        assert!(text.contains(&format!("\nHello {id}.\nSecond line of {id}.\n")), "{id} body:\n{text}");
    }
    // Reading (copy) left the flags alone: still unseen on the server.
    let state = server_state(&node, ALICE);
    assert_eq!(server_flags(&state, "INBOX", "u00").unwrap(), Vec::<String>::new());

    // Flag one, then file all of them into Archive on the server (copy, \Deleted, expunge).
    mutt(&node, &dir, "", "<flag-message><tag-pattern>~A<enter><tag-prefix><save-message>=Archive<enter><quit>");
    let state = server_state(&node, ALICE);
    assert_eq!(state["INBOX"]["msgs"].as_object().unwrap().len(), 0, "{state}");
    assert_eq!(state["Archive"]["msgs"].as_object().unwrap().len(), 5, "{state}");
    let flagged: Vec<&String> = ids
        .iter()
        .filter(|id| server_flags(&state, "Archive", id).unwrap().contains(&"\\Flagged".to_string()))
        .collect();
    assert_eq!(flagged.len(), 1, "{state}");
}

/// Mutt with a header cache resynchronises a mailbox it saw before: with QRESYNC (RFC 7162 §3.2)
/// by UID FETCH CHANGEDSINCE .. VANISHED, with COMPRESS=DEFLATE (RFC 4978) when offered. What it
/// then shows must match the server: expunged gone, flags changed, the new message there.
#[test]
fn mutt_resyncs_from_its_header_cache() {
    let node = Node::start(Setup::default());
    let ids = ids("q", 5);
    deliver(&node, &ids);
    let dir = node.dir.path().join("mutt");
    fs::create_dir_all(dir.join("hcache")).unwrap();
    let rc = format!(
        "set header_cache = \"{}/\"\nset imap_condstore = yes\nset imap_qresync = yes\nset imap_deflate = yes\n",
        dir.join("hcache").display()
    );
    let mbox = dir.join("first.mbox");
    mutt(&node, &dir, &rc, &copy_all_to(&mbox));
    assert_eq!(fs::read_to_string(&mbox).unwrap().matches("\nSubject: client test q").count(), 5);

    // Meanwhile on the server: q01 flagged and seen, q02 expunged, q05 delivered.
    python_imap(
        &node,
        &format!(
            "m = login({ALICE:?})\nm.select('INBOX')\nm.store('2', '+FLAGS', '(\\\\Flagged \\\\Seen)')\n\
             m.store('3', '+FLAGS', '(\\\\Deleted)')\nassert m.expunge()[1] == [b'3']\n"
        ),
    );
    deliver(&node, &["q05".to_string()]);
    let mbox = dir.join("second.mbox");
    mutt(&node, &dir, &rc, &copy_all_to(&mbox));
    let text = fs::read_to_string(&mbox).unwrap();
    let subjects: Vec<&str> = text.lines().filter(|l| l.starts_with("Subject: ")).collect();
    assert_eq!(
        subjects,
        [
            "Subject: client test q00",
            "Subject: client test q01",
            "Subject: client test q03",
            "Subject: client test q04",
            "Subject: client test q05"
        ],
        "{text}"
    );
    // mutt writes the flags it knows into the copy: Status R (seen), X-Status F (flagged).
    let q01 = text.split("\nFrom ").find(|m| m.contains("Subject: client test q01")).unwrap();
    assert!(q01.contains("\nStatus: RO\n") && q01.contains("\nX-Status: F\n"), "{q01}");
    let q00 = text.split("\nFrom ").find(|m| m.contains("Subject: client test q00")).unwrap();
    assert!(!q00.contains("\nX-Status: F"), "{q00}");

    let log = String::from_utf8_lossy(&fs::read(dir.join(".muttdebug0")).unwrap()).into_owned();
    let caps = log.lines().find(|l| l.contains("CAPABILITY IMAP4rev1")).expect("mutt logs the greeting").to_string();
    if caps.contains(" QRESYNC") {
        // The second session asked only for changes, learnt the expunge as VANISHED (EARLIER)
        // and fetched the headers of the new message alone.
        assert!(log.contains("ENABLE QRESYNC") && log.contains("(CHANGEDSINCE "), "{log}");
        assert!(log.contains("* VANISHED (EARLIER) 3"), "{log}");
    }
    if caps.contains(" COMPRESS=DEFLATE") {
        assert!(log.contains("COMPRESS DEFLATE"), "{log}");
    }
}

// --- imapclient -----------------------------------------------------------------------------

#[test]
fn imapclient_exercises_every_advertised_extension() {
    let node = Node::start(Setup::default());
    deliver(&node, &["p00".to_string(), "p01".to_string(), "p02".to_string()]);
    let script = format!(
        r#"
import imapclient, smtplib, threading, time
from imapclient.imapclient import SENT, DRAFTS, TRASH, ARCHIVE, JUNK
SMTP_PORT = {smtp}
def client():
    c = imapclient.IMAPClient(HOST, port=PORT, ssl=True, ssl_context=tls(), timeout=20)
    c.login('alice@example.test', PASSWORD)
    return c
c = client()
caps = set(c.capabilities())
for cap in [b'IDLE', b'MOVE', b'UIDPLUS', b'ESEARCH', b'SORT', b'THREAD=REFERENCES', b'THREAD=ORDEREDSUBJECT',
            b'SPECIAL-USE', b'NAMESPACE', b'ID', b'ENABLE', b'BINARY', b'MULTIAPPEND', b'UNSELECT', b'STATUS=SIZE',
            b'LIST-STATUS', b'CHILDREN']:
    assert cap in caps, (cap, caps)

# NAMESPACE (RFC 2342): one personal namespace, "/" separated.
ns = c.namespace()
assert ns.personal == (('', '/'),) and ns.other is None and ns.shared is None, ns
# ID (RFC 2971)
sid = c.id_({{'name': 'imapclient-test', 'version': imapclient.__version__}})
assert isinstance(sid, tuple) and b'name' in sid[0], sid
# ENABLE (RFC 5161): only what the server has is enabled, and nothing unknown.
enabled = [e.decode() if isinstance(e, bytes) else e for e in c.enable('CONDSTORE', 'X-NO-SUCH-THING')]
assert all(e.upper().encode() in caps for e in enabled) and 'X-NO-SUCH-THING' not in enabled, enabled
# SPECIAL-USE (RFC 6154)
assert c.find_special_folder(SENT) == 'Sent'
assert c.find_special_folder(DRAFTS) == 'Drafts'
assert c.find_special_folder(TRASH) == 'Trash'
assert c.find_special_folder(ARCHIVE) == 'Archive'
assert c.find_special_folder(JUNK) == 'Junk'
folders = {{f[2]: f[0] for f in c.list_folders()}}
assert b'\\Sent' in folders['Sent'] and b'\\HasNoChildren' in folders['INBOX'], folders
raw = c._imap
# LIST-EXTENDED (RFC 5258) with LIST-STATUS (RFC 5819) and the SPECIAL-USE selection (RFC 6154 §3).
typ, _ = raw._simple_command('LIST', '""', '*', 'RETURN', '(SPECIAL-USE STATUS (MESSAGES UIDNEXT))')
lists, statuses = raw.untagged_responses.pop('LIST'), raw.untagged_responses.pop('STATUS')
assert typ == 'OK' and b'(\\HasNoChildren \\Sent) "/" "Sent"' in lists, lists
assert b'"INBOX" (MESSAGES 3 UIDNEXT 4)' in statuses and len(statuses) == len(lists), statuses
typ, _ = raw._simple_command('LIST', '(SPECIAL-USE)', '""', '*')
lists = raw.untagged_responses.pop('LIST')
assert typ == 'OK' and len(lists) == 5 and not any(b'INBOX' in l for l in lists), lists
# CREATE-SPECIAL-USE (RFC 6154 §3): \Archive can be given, \Flagged (a virtual view) cannot.
typ, data = raw._simple_command('CREATE', 'Old', '(USE (\\Archive))')
assert typ == 'OK', data
assert b'\\Archive' in {{f[2]: f[0] for f in c.list_folders()}}['Old']
typ, data = raw._simple_command('CREATE', 'Flg', '(USE (\\Flagged))')
assert typ == 'NO' and data[0].startswith(b'[USEATTR]') and not c.folder_exists('Flg'), data
c.delete_folder('Old')
# APPENDLIMIT (RFC 7889)
assert b'APPENDLIMIT=50000000' in caps, caps
# Folders
assert c.create_folder('Projects/2026')
assert c.folder_exists('Projects/2026') and c.folder_exists('Projects')
assert b'\\HasChildren' in {{f[2]: f[0] for f in c.list_folders()}}['Projects']
c.rename_folder('Projects/2026', 'Projects/2027')
assert c.folder_exists('Projects/2027') and not c.folder_exists('Projects/2026')
c.subscribe_folder('Projects/2027')
# Non-ASCII names travel as modified UTF-7 (RFC 3501 §5.1.3), which imapclient encodes and decodes.
c.create_folder('Entwürfe/日本')
c.rename_folder('Entwürfe/日本', 'Entwürfe/中文')
assert [f[2] for f in c.list_folders('', 'Entw*')] == ['Entwürfe', 'Entwürfe/中文'], c.list_folders('', 'Entw*')
assert b'"Entw&APw-rfe/&Ti1lhw-"' in raw.list('""', 'Entw*')[1][1], raw.list('""', 'Entw*')
c.delete_folder('Entwürfe/中文')
assert 'Projects/2027' in [f[2] for f in c.list_sub_folders()]
# STATUS with SIZE (RFC 8438)
st = c.folder_status('INBOX', ['MESSAGES', 'UIDNEXT', 'UIDVALIDITY', 'UNSEEN', 'SIZE'])
assert st[b'MESSAGES'] == 3 and st[b'UIDNEXT'] == 4 and st[b'UNSEEN'] == 3 and st[b'SIZE'] > 300, st

# APPEND and MULTIAPPEND (RFC 3502) with APPENDUID (RFC 4315).
sel = c.select_folder('Projects/2027')
uidvalidity = sel[b'UIDVALIDITY']
r = c.append('Projects/2027', b'Subject: one\r\nMessage-ID: <a1@x>\r\n\r\nbody one\r\n', flags=[imapclient.SEEN])
assert r == b'[APPENDUID %d 1] APPEND completed' % uidvalidity, r
typ, data = c.multiappend('Projects/2027', [
    b'Subject: two\r\nMessage-ID: <a2@x>\r\n\r\nbody two\r\n',
    {{'msg': b'Subject: three\r\nMessage-ID: <a3@x>\r\n\r\n\xc3\xa9t\xc3\xa9 body\r\n', 'flags': [imapclient.FLAGGED]}},
])
assert typ == 'OK' and data[0].startswith(b'[APPENDUID %d 2:3]' % uidvalidity), data
c.noop()
assert c.get_flags([1, 2, 3]) == {{1: (b'\\Seen',), 2: (), 3: (b'\\Flagged',)}}, c.get_flags([1, 2, 3])

# COPY and MOVE (RFC 6851) with COPYUID; imaplib keeps response codes in untagged_responses.
c.select_folder('INBOX')
raw.untagged_responses.pop('COPYUID', None)
c.copy([1, 2], 'Projects/2027')
copyuid = raw.untagged_responses.pop('COPYUID')
assert copyuid == [b'%d 1:2 4:5' % uidvalidity], copyuid
c.move([3], 'Projects/2027')
copyuid = raw.untagged_responses.pop('COPYUID')
assert copyuid == [b'%d 3 6' % uidvalidity], copyuid
assert c.search() == [1, 2]
st = c.folder_status('Projects/2027', ['MESSAGES', 'UIDNEXT'])
assert st == {{b'MESSAGES': 6, b'UIDNEXT': 7}}, st

# SEARCH (with a UTF-8 charset), ESEARCH (RFC 4731), SORT and THREAD (RFC 5256).
c.select_folder('Projects/2027')
assert c.search(['SUBJECT', 'two']) == [2]
assert c.search(['BODY', 'été'], charset='UTF-8') == [3]
assert c.search(['FLAGGED']) == [3]
assert c.search(['UNSEEN']) == [2, 3, 4, 5, 6], c.search(['UNSEEN'])
typ, data = raw.uid('SEARCH', 'RETURN', '(MIN MAX COUNT ALL)', 'ALL')
es = raw.untagged_responses.pop('ESEARCH', [])
assert typ == 'OK' and len(es) == 1, (typ, data, es)
assert b'UID' in es[0] and b'MIN 1' in es[0] and b'MAX 6' in es[0] and b'COUNT 6' in es[0] and b'ALL 1:6' in es[0], es
assert c.sort('SUBJECT') == [4, 5, 6, 1, 3, 2], c.sort('SUBJECT')
assert c.sort(['REVERSE', 'SUBJECT']) == [2, 3, 1, 6, 5, 4], c.sort(['REVERSE', 'SUBJECT'])
threads = c.thread('REFERENCES')
assert sorted(m for t in threads for m in t) == [1, 2, 3, 4, 5, 6], threads
threads = c.thread('ORDEREDSUBJECT')
assert sorted(m for t in threads for m in t) == [1, 2, 3, 4, 5, 6], threads

# BINARY (RFC 3516): decoded section and its size.
f = c.fetch([3], ['BINARY.PEEK[1]', 'BINARY.SIZE[1]', 'RFC822.SIZE', 'ENVELOPE'])[3]
assert f[b'BINARY[1]'] == 'été body\r\n'.encode(), f
assert f[b'BINARY.SIZE[1]'] == len('été body\r\n'.encode()), f
assert f[b'ENVELOPE'].subject == b'three', f
# Flags, expunge by UID (UIDPLUS), UNSELECT.
c.add_flags([4], [imapclient.DELETED, b'$Label1'])
c.add_flags([5], [imapclient.DELETED])
c.uid_expunge([4])
assert c.search() == [1, 2, 3, 5, 6], c.search()
assert c.get_flags([5]) == {{5: (b'\\Deleted',)}}
c.unselect_folder()
assert c.folder_status('Projects/2027', ['MESSAGES'])[b'MESSAGES'] == 5, 'UNSELECT expunged nothing'

# IDLE (RFC 2177): a delivery over SMTP wakes it with EXISTS.
c.select_folder('INBOX')
c.idle()
def deliver():
    time.sleep(0.3)
    s = smtplib.SMTP(HOST, SMTP_PORT, timeout=20)
    s.sendmail('sender@peer.test', ['alice@example.test'], b'Subject: idle\r\nMessage-ID: <idle@x>\r\n\r\nwake up\r\n')
    s.quit()
threading.Thread(target=deliver).start()
got = []
deadline = time.time() + 15
while time.time() < deadline and not any(r[1] == b'EXISTS' for r in got):
    got += c.idle_check(timeout=1)
c.idle_done()
assert (3, b'EXISTS') in got, got
assert c.search(['HEADER', 'Message-ID', '<idle@x>']) == [4]

# CONDSTORE (RFC 7162 §3.1), when advertised: enabled above, so SELECT reports HIGHESTMODSEQ,
# FETCH CHANGEDSINCE returns only what changed, SEARCH MODSEQ reports the highest mod-sequence.
if b'CONDSTORE' in caps:
    assert 'CONDSTORE' in enabled, enabled
    hms = c.select_folder('INBOX')[b'HIGHESTMODSEQ']
    c.add_flags([2], [imapclient.FLAGGED])
    changed = c.fetch(c.search(), ['FLAGS'], modifiers=['CHANGEDSINCE %d' % hms])
    assert list(changed) == [2] and changed[2][b'MODSEQ'][0] > hms, (hms, changed)
    found = c.search(['MODSEQ', hms + 1])
    assert found == [2] and found.modseq == changed[2][b'MODSEQ'][0], (found, found.modseq, changed)
    assert c.folder_status('INBOX', ['HIGHESTMODSEQ'])[b'HIGHESTMODSEQ'] == found.modseq
# QUOTA (RFC 9208), when advertised: no quota configured, INBOX is under no root.
if b'QUOTA' in caps:
    roots, quotas = c.get_quota_root('INBOX')
    assert roots.mailbox == 'INBOX' and quotas == [], (roots, quotas)
# DELETE, LOGOUT
c.delete_folder('Projects/2027')
assert not c.folder_exists('Projects/2027')
c.logout()
print('ok')
"#,
        smtp = node.smtp.port()
    );
    let out = python_imap(&node, &script);
    assert_eq!(out.trim(), "ok", "{out}");
}
