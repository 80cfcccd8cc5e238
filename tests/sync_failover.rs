//! Failover between two real primaries (issue 8): a client that synced against node A and is
//! then pointed at node B re-downloads nothing and misses no change.
//!
//! - mbsync keeps its Maildir and sync state: against B it pulls no message, creates no
//!   duplicate, pulls one new delivery as one file and pushes flags set in the Maildir.
//! - A QRESYNC client (RFC 7162 §3.2.5) cached INBOX on A with A's HIGHESTMODSEQ. Modseqs are
//!   per node counters (docs/design/replication-plan.md §2.5), and A's counter is made to run
//!   far ahead of B's, so B must not compare A's value with its own: it must report every flag
//!   change and the expunge made since, on `SELECT (QRESYNC ...)` and on `UID FETCH
//!   (CHANGEDSINCE ...)`, and B's own values must then work incrementally.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{converge, deliver, wait_connected, Primaries, ALICE};
use common::{python_imap, Node};

/// Two primaries (`[sync] order`: a first) that dial each other directly.
fn cluster() -> Primaries {
    Primaries::new("order = [\"a\", \"b\"]", false)
}

// --- mbsync ---------------------------------------------------------------------------------

/// Runs mbsync with its IMAP dialogue logged (-Dn); panics on failure or after 60 s.
fn mbsync(node: &Node, rc: &Path) -> String {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("mbsync")
        .args(["-Dn", "-c"])
        .arg(rc)
        .arg("-a")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("mbsync: {e} (the test command installs it)"));
    let deadline = Instant::now() + Duration::from_secs(60);
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
    assert!(status.is_some_and(|s| s.success()), "mbsync failed or hung:\n{out}\nserver log:\n{}", node.log());
    out
}

/// The same mbsync configuration, pointed at `node` (only the port differs between nodes).
fn write_rc(rc: &Path, node: &Node, maildir: &Path) {
    fs::write(
        rc,
        format!(
            "IMAPAccount test\nHost 127.0.0.1\nPort {}\nUser {ALICE}\nPass {}\nSSLType IMAPS\n\
             CertificateFile {}\n\nIMAPStore remote\nAccount test\n\nMaildirStore local\nPath {}/\nInbox {}/INBOX\n\
             SubFolders Verbatim\n\nChannel test\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n\
             Expunge Both\nSync All\nSyncState *\n",
            node.imaps.port(),
            common::PASSWORD,
            node.cert.display(),
            maildir.display(),
            maildir.display()
        ),
    )
    .unwrap();
}

/// Gives a message file new Maildir flags (into cur/, letters in ASCII order).
fn set_file_flags(path: &Path, flags: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let base = name.split_once(":2,").map(|(b, _)| b).unwrap_or(name);
    let new = path.parent().unwrap().parent().unwrap().join("cur").join(format!("{base}:2,{flags}"));
    fs::rename(path, new).unwrap();
}

/// The commands of an mbsync -Dn log that download message bodies.
fn body_fetches(log: &str) -> Vec<&str> {
    log.lines()
        // Pipelined commands are logged as `(n in progress) >>> ...`.
        .filter_map(|l| l.split_once(">>> ").map(|(_, c)| c))
        .filter(|l| {
            // RFC822.SIZE and RFC822.HEADER are not bodies; RFC822, BODY[] and BODY.PEEK[] are.
            let l = l.replace("RFC822.", "");
            l.contains("FETCH") && (l.contains("BODY.PEEK[]") || l.contains("BODY[]") || l.contains("RFC822"))
        })
        .collect()
}

/// The Message-IDs in the INBOX Maildir, asserting that none appears twice.
fn unique_ids(inbox: &Path) -> BTreeSet<String> {
    let files = common::maildir_files(inbox);
    let ids: BTreeSet<String> = files.iter().map(|f| common::maildir_message_id(f)).collect();
    assert_eq!(ids.len(), files.len(), "duplicate messages in the Maildir: {files:?}");
    ids
}

#[test]
fn mbsync_fails_over_to_the_other_node_without_downloading_again() {
    let c = cluster();
    let mut a = c.start("a");
    let b = c.start("b");
    wait_connected(&a, "b");
    deliver(&a, 0..30, "f");
    let state = converge(&a, &b, Duration::from_secs(60));
    assert!(state.contains("\n  30 "), "same UIDs on both nodes:\n{state}");

    let home = c.dir.path().join("mbsync");
    let maildir = home.join("Mail");
    fs::create_dir_all(&maildir).unwrap();
    let rc = home.join("mbsyncrc");
    write_rc(&rc, &a, &maildir);
    let log = mbsync(&a, &rc);
    let inbox = maildir.join("INBOX");
    assert!(!body_fetches(&log).is_empty(), "A's messages come down:\n{log}");
    let before = unique_ids(&inbox);
    assert_eq!(before.len(), 30, "{log}");

    // Failover: A is gone, the same configuration and sync state now talk to B.
    a.stop();
    write_rc(&rc, &b, &maildir);
    let log = mbsync(&b, &rc);
    assert_eq!(body_fetches(&log), Vec::<&str>::new(), "no message is downloaded again from B:\n{log}");
    assert_eq!(unique_ids(&inbox), before, "the Maildir is unchanged:\n{log}");

    // A delivery to B arrives as exactly one new file; flags set locally go up to B.
    deliver(&b, 0..1, "after");
    let mut files = common::maildir_files(&inbox);
    files.retain(|f| ["f3@", "f4@"].iter().any(|p| common::maildir_message_id(f).starts_with(p)));
    assert_eq!(files.len(), 2);
    for f in &files {
        set_file_flags(f, if common::maildir_message_id(f).starts_with("f3@") { "S" } else { "FS" });
    }
    let log = mbsync(&b, &rc);
    assert_eq!(body_fetches(&log).len(), 1, "one FETCH for the one new message:\n{log}");
    let after = unique_ids(&inbox);
    assert_eq!(after.len(), 31, "{log}");
    assert_eq!(after.difference(&before).collect::<Vec<_>>(), [&"after0@peer.test".to_string()], "{log}");
    let flags = python_imap(
        &b,
        &format!(
            "import re\nm = login({ALICE:?})\nm.select('INBOX', readonly=True)\n\
             for uid in (4, 5):\n\
             \x20   typ, d = m.uid('FETCH', str(uid), '(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])')\n\
             \x20   print(re.search(rb'<(.*?)@', d[0][1]).group(1).decode(), ' '.join(sorted(re.search(rb'FLAGS \\((.*?)\\)', d[0][0]).group(1).decode().split())))\n"
        ),
    );
    assert_eq!(flags, "f3 \\Seen\nf4 \\Flagged \\Seen\n", "flags pushed to B:\n{log}");
}

// --- QRESYNC --------------------------------------------------------------------------------

/// More Python helpers, after `common::PY_RAW_IMAP`: the flags per UID in FETCH responses, and
/// the UIDs a `VANISHED (EARLIER)` names.
const HELPERS: &str = r#"
def flags_of(lines):
    import re
    out = {}
    for l in lines:
        r = re.match(r'\* \d+ FETCH \((.*)\)$', l)
        if r:
            uid = int(re.search(r'UID (\d+)', l).group(1))
            out[uid] = sorted(re.search(r'FLAGS \((.*?)\)', l).group(1).split())
    return out

def vanished(lines):
    out = set()
    for l in lines:
        if l.startswith('* VANISHED (EARLIER) '):
            for part in l.split()[-1].split(','):
                lo, _, hi = part.partition(':')
                out |= set(range(int(lo), int(hi or lo) + 1))
    return out
"#;

fn run(node: &Node, script: &str) -> String {
    python_imap(node, &format!("{}{HELPERS}{script}", common::PY_RAW_IMAP))
}

#[test]
fn a_qresync_client_that_fails_over_misses_no_change() {
    let c = cluster();
    let mut a = c.start("a");
    let mut b = c.start("b");
    wait_connected(&a, "b");
    deliver(&a, 1..9, "q");
    converge(&a, &b, Duration::from_secs(60));
    // A's modseq counter runs far ahead of B's: 60 flag changes while B is down reach B as
    // one change.
    b.stop();
    run(
        &a,
        "m = login('alice@example.test')\nm.select('INBOX')\n\
         for i in range(30):\n\
         \x20   m.uid('STORE', '8', '+FLAGS', '(churn)')\n\
         \x20   m.uid('STORE', '8', '-FLAGS', '(churn)')\n",
    );
    b.launch();
    converge(&a, &b, Duration::from_secs(60));

    // The client caches INBOX on A.
    let cached = run(
        &a,
        "a = qresync_session()\nsel = ok(cmd(a, 'SELECT INBOX'))\n\
         cache = flags_of(ok(cmd(a, 'UID FETCH 1:* (FLAGS MODSEQ)')))\nassert sorted(cache) == list(range(1, 9)), cache\n\
         print(code(sel, 'UIDVALIDITY'), code(sel, 'HIGHESTMODSEQ'))\n",
    );
    let (uv, h0) = cached.trim().split_once(' ').unwrap();
    let h0: u64 = h0.parse().unwrap();

    // While it is away: on A, flags on 2 and 3 and UID 4 expunged; A stops; on B, flags on 5
    // and 6.
    run(
        &a,
        "m = login('alice@example.test')\nm.select('INBOX')\n\
         assert m.uid('STORE', '2', '+FLAGS', '(\\\\Seen)')[0] == 'OK'\n\
         assert m.uid('STORE', '3', '+FLAGS', '($Work)')[0] == 'OK'\n\
         assert m.uid('STORE', '4', '+FLAGS', '(\\\\Deleted)')[0] == 'OK'\n\
         assert m.expunge()[0] == 'OK'\n",
    );
    converge(&a, &b, Duration::from_secs(60));
    a.stop();
    run(
        &b,
        "m = login('alice@example.test')\nm.select('INBOX')\n\
         assert m.uid('STORE', '5', '+FLAGS', '(\\\\Flagged)')[0] == 'OK'\n\
         assert m.uid('STORE', '6', '+FLAGS', '(\\\\Answered)')[0] == 'OK'\n",
    );

    // Back on B with A's state: every change, on SELECT (QRESYNC) and on CHANGEDSINCE.
    let out = run(
        &b,
        &format!(
            "b = qresync_session()\nsel = ok(cmd(b, 'SELECT INBOX (QRESYNC ({uv} {h0}))'))\n\
             assert code(sel, 'UIDVALIDITY') == {uv}, sel\n\
             got = flags_of(sel)\n\
             assert 4 in vanished(sel), sel\n\
             want = {{2: ['\\\\Seen'], 3: ['$Work'], 5: ['\\\\Flagged'], 6: ['\\\\Answered']}}\n\
             for uid, f in want.items():\n\
             \x20   assert got.get(uid) == f, (uid, sel)\n\
             assert 4 not in got, sel\n\
             fetched = ok(cmd(b, 'UID FETCH 1:* (FLAGS) (CHANGEDSINCE {h0} VANISHED)'))\n\
             assert 4 in vanished(fetched), fetched\n\
             got = flags_of(fetched)\n\
             for uid, f in want.items():\n\
             \x20   assert got.get(uid) == f, (uid, fetched)\n\
             fetched = ok(cmd(b, 'UID FETCH 1:* (FLAGS) (CHANGEDSINCE {h0})'))\n\
             assert all(flags_of(fetched).get(u) == f for u, f in want.items()), fetched\n\
             # A conditional STORE with A's value cannot know B's state: MODIFIED, nothing stored.\n\
             lines, status = cmd(b, 'UID STORE 7 (UNCHANGEDSINCE {h0}) +FLAGS (\\\\Seen)')\n\
             assert status.startswith('OK [MODIFIED 7]'), (lines, status)\n\
             h1 = code(sel, 'HIGHESTMODSEQ')\n\
             # SEARCH MODSEQ with A's value matches everything; every value B shows carries B's tag.\n\
             found = ok(cmd(b, 'UID SEARCH MODSEQ {h0}'))\n\
             assert [int(x) for x in found[0].split('(')[0].split()[2:]] == [1, 2, 3, 5, 6, 7, 8], found\n\
             import re\n\
             shown = [int(x) for x in re.findall(r'MODSEQ \\(?(\\d+)', ' '.join(found + ok(cmd(b, 'UID FETCH 1:* (MODSEQ)'))))]\n\
             assert len(shown) == 8 and all(m % 16 == h1 % 16 for m in shown), (h1, shown)\n\
             b.logout()\n\
             print(h1)\n"
        ),
    );
    let h1: u64 = out.trim().parse().unwrap();
    assert_ne!(h1 % 16, h0 % 16, "A and B tag their modseqs differently ({h0}, {h1})");
    eprintln!("HIGHESTMODSEQ cached from A {h0}, B's after failover {h1}");

    // B's own value works incrementally: only what changed since.
    let out = run(
        &b,
        &format!(
            "m = login('alice@example.test')\nm.select('INBOX')\n\
             assert m.uid('STORE', '7', '+FLAGS', '(\\\\Draft)')[0] == 'OK'\n\
             b = qresync_session()\nsel = ok(cmd(b, 'SELECT INBOX (QRESYNC ({uv} {h1}))'))\n\
             assert flags_of(sel) == {{7: ['\\\\Draft']}}, sel\n\
             assert vanished(sel) == set(), sel\n\
             fetched = ok(cmd(b, 'UID FETCH 1:* (FLAGS) (CHANGEDSINCE {h1} VANISHED)'))\n\
             assert flags_of(fetched) == {{7: ['\\\\Draft']}}, fetched\n\
             print('ok')\n"
        ),
    );
    assert_eq!(out.trim(), "ok");
}
