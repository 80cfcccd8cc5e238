//! CONDSTORE and QRESYNC (RFC 7162) on the real binary with Python's imaplib: a client caches
//! a mailbox, goes away while another session changes flags, expunges and appends, and comes
//! back with `SELECT (QRESYNC ...)` to get exactly the VANISHED (EARLIER) and FETCH lines that
//! bring its cache up to date; and a conditional STORE that loses against another session's
//! change reports it in MODIFIED.

mod common;

use common::*;

fn deliver(node: &Node, id: &str) {
    assert_eq!(
        send_message(node, "sender@peer.test", &["alice@example.test"], &message(id, "alice@example.test")).0,
        250
    );
}

fn run(node: &Node, script: &str) -> String {
    python_imap(node, &format!("{PY_RAW_IMAP}{script}"))
}

#[test]
fn qresync_resynchronises_a_cached_mailbox() {
    let node = Node::start(Setup::default());
    for i in 1..=6 {
        deliver(&node, &format!("m{i}"));
    }
    let out = run(
        &node,
        r#"
import time
# The client's first visit: it caches UIDVALIDITY, HIGHESTMODSEQ and every message.
a = qresync_session()
sel = ok(cmd(a, 'SELECT INBOX'))
uv, h0 = code(sel, 'UIDVALIDITY'), code(sel, 'HIGHESTMODSEQ')
cache = ok(cmd(a, 'FETCH 1:* (UID FLAGS MODSEQ)'))
assert len(cache) == 6 and all('MODSEQ (' in l for l in cache), cache
a.logout()

# While it is away: flags on 2 and 4, 3 and 5 expunged, one message appended.
b = login('alice@example.test')
b.select('INBOX')
assert b.uid('STORE', '2', '+FLAGS', '(\\Seen)')[0] == 'OK'
assert b.uid('STORE', '4', '+FLAGS', '($Work)')[0] == 'OK'
assert b.uid('STORE', '3,5', '+FLAGS', '(\\Deleted)')[0] == 'OK'
assert b.expunge()[0] == 'OK'
assert b.append('INBOX', None, None, b'Subject: new\r\n\r\nnew\r\n')[0] == 'OK'

# Back with the cached state: exactly what changed among the UIDs it knows.
a = qresync_session()
t = time.monotonic()
sel = ok(cmd(a, 'SELECT INBOX (QRESYNC (%d %d 1:6))' % (uv, h0)))
elapsed = time.monotonic() - t
h1 = code(sel, 'HIGHESTMODSEQ')
assert h1 > h0, (h0, h1)
assert '* 5 EXISTS' in sel, sel
resync = [l for l in sel if l.startswith('* VANISHED') or ' FETCH ' in l]
m2 = [l for l in resync if 'UID 2 ' in l][0].split('MODSEQ (')[1].rstrip(')')
m4 = [l for l in resync if 'UID 4 ' in l][0].split('MODSEQ (')[1].rstrip(')')
assert resync == [
    '* VANISHED (EARLIER) 3,5',
    '* 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (%s))' % m2,
    '* 3 FETCH (UID 4 FLAGS ($Work) MODSEQ (%s))' % m4,
], resync
assert h0 < int(m2) < int(m4) <= h1
print(json.dumps(resync))
print(json.dumps({'elapsed_ms': round(elapsed * 1000, 1)}))

# Without known UIDs the new message is reported too; from the new HIGHESTMODSEQ nothing.
sel = ok(cmd(a, 'SELECT INBOX (QRESYNC (%d %d))' % (uv, h0)))
assert sel[0] == '* OK [CLOSED] Previous mailbox closed', sel
resync = [l for l in sel if l.startswith('* VANISHED') or ' FETCH ' in l]
assert resync[0] == '* VANISHED (EARLIER) 3,5' and len(resync) == 4, resync
assert resync[3].startswith('* 5 FETCH (UID 7 FLAGS () MODSEQ ('), resync
sel = ok(cmd(a, 'SELECT INBOX (QRESYNC (%d %d 1:7))' % (uv, h1)))
assert not [l for l in sel if l.startswith('* VANISHED') or ' FETCH ' in l], sel
# Known UIDs 1:3 limit both parts; the sequence match data is accepted.
sel = ok(cmd(a, 'SELECT INBOX (QRESYNC (%d %d 1:3 (1:3 1:3)))' % (uv, h0)))
resync = [l for l in sel if l.startswith('* VANISHED') or ' FETCH ' in l]
assert resync == ['* VANISHED (EARLIER) 3', '* 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (%s))' % m2], resync
# Another UIDVALIDITY: the client's cache is useless, nothing is resynchronised.
sel = ok(cmd(a, 'SELECT INBOX (QRESYNC (%d %d 1:6))' % (uv + 1, h0)))
assert not [l for l in sel if l.startswith('* VANISHED') or ' FETCH ' in l], sel
assert code(sel, 'HIGHESTMODSEQ') == h1

# UID FETCH (CHANGEDSINCE VANISHED) gives the same answer within the session.
lines = ok(cmd(a, 'UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)' % h0))
assert lines[0] == '* VANISHED (EARLIER) 3,5' and len(lines) == 4, lines

# Expunged while selected: VANISHED, not EXPUNGE.
assert b.uid('STORE', '6', '+FLAGS', '(\\Deleted)')[0] == 'OK'
assert b.expunge()[0] == 'OK'
lines = ok(cmd(a, 'NOOP'))
assert lines == ['* VANISHED 6'], lines
b.logout()
a.logout()
print('ok')
"#,
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
    assert!(out.contains(r#"["* VANISHED (EARLIER) 3,5", "* 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ ("#), "{out}");
    eprintln!("QRESYNC SELECT with 2 VANISHED and 2 FETCH: {}", out.lines().next().unwrap_or_default());
}

#[test]
fn conditional_store_reports_modified() {
    let node = Node::start(Setup::default());
    for i in 1..=3 {
        deliver(&node, &format!("c{i}"));
    }
    let out = run(
        &node,
        r#"
a = login('alice@example.test')
sel = ok(cmd(a, 'SELECT INBOX (CONDSTORE)'))
code(sel, 'HIGHESTMODSEQ')
cache = {}
for l in ok(cmd(a, 'UID FETCH 1:* (MODSEQ)')):
    uid = int(l.split('UID ')[1].split()[0])
    cache[uid] = int(l.split('MODSEQ (')[1].split(')')[0])
# Another session changes message 1 after A cached it.
b = login('alice@example.test')
b.select('INBOX')
assert b.uid('STORE', '1', '+FLAGS', '(\\Flagged)')[0] == 'OK'
b.logout()
# A stores on 1:3, each conditional on the modseq it cached: 1 fails, 2 and 3 change.
lines, done = cmd(a, 'UID STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Answered)' % max(cache[2], cache[3]))
assert done == 'OK [MODIFIED 1] Conditional UID STORE failed', (lines, done)
stored = [l for l in lines if '\\Answered' in l]
assert len(stored) == 2 and all('MODSEQ (' in l for l in stored), lines
# Message 1 kept B's flags only; the session heard of B's change with its MODSEQ.
assert any(l.startswith('* 1 FETCH (UID 1 FLAGS (\\Flagged) MODSEQ (') for l in lines + ok(cmd(a, 'NOOP'))), lines
flags = ok(cmd(a, 'FETCH 1:3 (FLAGS)'))
assert flags == ['* 1 FETCH (FLAGS (\\Flagged))', '* 2 FETCH (FLAGS (\\Answered))', '* 3 FETCH (FLAGS (\\Answered))'], flags
# UNCHANGEDSINCE at the current modseq succeeds; by sequence number MODIFIED has sequence numbers.
m1 = int(ok(cmd(a, 'FETCH 1 (MODSEQ)'))[0].split('MODSEQ (')[1].split(')')[0])
lines, done = cmd(a, 'STORE 1:2 (UNCHANGEDSINCE %d) +FLAGS (\\Seen)' % m1)
# Message 2 changed after message 1 (A's own STORE), so it is the one refused.
assert done == 'OK [MODIFIED 2] Conditional STORE failed', (lines, done)
assert len(lines) == 1 and lines[0].startswith('* 1 FETCH (FLAGS (\\Seen \\Flagged) MODSEQ ('), lines
a.logout()
print('ok')
"#,
    );
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

/// `highest(m)`: HIGHESTMODSEQ of INBOX by STATUS.
const PY_HIGHEST: &str = "
def highest(m):
    for l in ok(cmd(m, 'STATUS INBOX (HIGHESTMODSEQ)')):
        if l.startswith('* STATUS'):
            return int(l.split('HIGHESTMODSEQ ')[1].rstrip(')'))
";

/// A node that replicated shows modseqs as `counter << 4 | tag`; restarted on the same data
/// without `[sync]` it keeps the tag it had, so HIGHESTMODSEQ does not shrink 16 times under a
/// client that cached it (RFC 7162 §3.1.2.1), and that client's value still names this node's
/// counter: CHANGEDSINCE it reports exactly the later change.
#[test]
fn modseqs_do_not_shrink_when_sync_is_removed() {
    // Node a of a two-primary cluster whose peer never runs.
    let c = common::cluster::Primaries::new("", false);
    let mut a = c.start("a");
    deliver(&a, "m1");
    deliver(&a, "m2");
    let first = run(
        &a,
        &format!(
            "{PY_HIGHEST}m = login('alice@example.test')\nok(cmd(m, 'SELECT INBOX'))\n\
         ok(cmd(m, 'STORE 1 +FLAGS (\\\\Seen)'))\nprint(highest(m))\n"
        ),
    );
    let h1: u64 = first.trim().parse().unwrap();
    assert!(h1 & 15 != 0, "a replicating node tags its modseqs: {h1}");
    a.stop();

    // The same data directory, the same node, no `[sync]`.
    let text = std::fs::read_to_string(c.config()).unwrap();
    let single = text.replace("[sync]\n", "");
    assert_ne!(single, text);
    let path = c.dir.path().join("single.toml");
    std::fs::write(&path, single).unwrap();
    let a = Node::start_named(&path, "a");
    let out = run(
        &a,
        &format!(
            r#"{PY_HIGHEST}
m = login('alice@example.test')
h2 = highest(m)
assert h2 >= {h1}, ('HIGHESTMODSEQ went down', {h1}, h2)
ok(cmd(m, 'SELECT INBOX'))
ok(cmd(m, 'STORE 2 +FLAGS (\\Flagged)'))
h3 = highest(m)
assert h3 > h2, ('a change raises HIGHESTMODSEQ', h2, h3)
assert h3 & 15 == {h1} & 15, ('the tag is kept', {h1}, h3)
changed = ok(cmd(m, 'FETCH 1:* (FLAGS) (CHANGEDSINCE {h1})'))
assert len(changed) == 1 and changed[0].startswith('* 2 FETCH') and 'MODSEQ (%d)' % h3 in changed[0], changed
print(h2, h3)
"#
        ),
    );
    eprintln!("HIGHESTMODSEQ with [sync] {h1}, after its removal {}", out.trim());
}
