//! APPEND on the real binary with Python imaplib: a ~5 MB message goes in (streamed into the
//! store chunk by chunk) and comes back byte-identical; a 4 GB announcement is refused with
//! `NO [TOOBIG]` and the session stays usable; COPY and MOVE answer with UIDPLUS codes.

mod common;

use common::*;

#[test]
fn imaplib_appends_large_messages_and_refuses_huge_ones() {
    let node = Node::start(Setup::default());
    let out = python_imap(
        &node,
        r#"
import re, time
m = login('alice@example.test')
caps = m.capabilities
for c in ('UIDPLUS', 'MOVE', 'LITERAL+', 'MULTIAPPEND', 'APPENDLIMIT=50000000'):
    assert c in caps, caps
# About 5 MB of CRLF lines, with every byte value a line may hold.
lines = [b'Subject: big', b'From: a@example.test', b'']
i = total = 0
while total < 5_000_000:
    lines.append(b'%08d ' % i + bytes(range(32, 127)) + bytes(range(0x80, 0x100)))
    total += len(lines[-1]) + 2
    i += 1
msg = b'\r\n'.join(lines) + b'\r\n'
t0 = time.time()
typ, data = m.append('INBOX', '(\\Seen $Big)', imaplib.Time2Internaldate(1700000000), msg)
assert typ == 'OK', data
code = re.match(rb'\[APPENDUID (\d+) (\d+)\]', data[0])
assert code, data
uid = code.group(2).decode()
print('append %.2f s' % (time.time() - t0))
t0 = time.time()
m.select('INBOX')
typ, data = m.uid('FETCH', uid, '(FLAGS RFC822.SIZE BODY.PEEK[])')
assert typ == 'OK', data
assert data[0][1] == msg, (len(data[0][1]), len(msg))
print('fetch %.2f s' % (time.time() - t0))
assert b'RFC822.SIZE %d' % len(msg) in data[0][0], data[0][0]
assert b'\\Seen' in data[0][0] and b'$Big' in data[0][0], data[0][0]
# {4000000000}: NO [TOOBIG] before any continuation; nothing of that size is allocated, and
# the session goes on.
m.send(b'X1 APPEND INBOX {4000000000}\r\n')
line = m.readline()
assert line.startswith(b'X1 NO [TOOBIG]'), line
typ, data = m.noop()
assert typ == 'OK', data
# No such mailbox: TRYCREATE.
typ, data = m.append('Nowhere', None, None, b'Subject: x\r\n\r\nx\r\n')
assert typ == 'NO' and b'TRYCREATE' in data[0], data
# COPY and MOVE with COPYUID.
typ, data = m._simple_command('UID', 'COPY', uid, 'Archive')
assert typ == 'OK' and re.match(rb'\[COPYUID \d+ %s 1\]' % uid.encode(), data[0]), data
typ, data = m._simple_command('UID', 'MOVE', uid, 'Trash')
assert typ == 'OK', data
oks = m.untagged_responses.get('OK', [])
assert any(re.match(rb'\[COPYUID \d+ %s 1\]' % uid.encode(), o) for o in oks), oks
m.select('Trash')
typ, data = m.fetch('1', '(BODY.PEEK[])')
assert data[0][1] == msg
print('done')
m.logout()
"#,
    );
    println!("{out}");
    assert!(out.contains("done"), "{out}");
}
