//! SEARCH on the real binary with Python imaplib: header keys match RFC 2047-decoded values,
//! BODY/TEXT match decoded text parts (quoted-printable ISO-8859-1, base64 UTF-8, HTML), never
//! raw base64 or attachments, CHARSET converts the search string, and ESEARCH works.

mod common;

use base64::Engine;
use common::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

fn deliver(node: &Node, msg: &str) {
    assert_eq!(send_message(node, "sender@peer.test", &["alice@example.test"], msg).0, 250);
}

#[test]
fn imaplib_searches_decoded_mime() {
    let node = Node::start(Setup::default());
    let head = |from: &str, subject: &str| {
        format!(
            "From: {from}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\
             Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        )
    };
    // 1: an RFC 2047 base64 UTF-8 subject, a plain body.
    deliver(
        &node,
        &format!(
            "{}Content-Type: text/plain\r\n\r\nnothing special here\r\n",
            head("Sender <sender@peer.test>", &format!("=?UTF-8?B?{}?=", b64("Grüße aus Köln")))
        ),
    );
    // 2: a Q-encoded ISO-8859-1 subject and a quoted-printable ISO-8859-1 body.
    deliver(
        &node,
        &format!(
            "{}Content-Type: text/plain; charset=ISO-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
             Le caf=E9 cr=E8me est pr=EAt, soft=\r\nbreak joined.\r\n",
            head("Sender <sender@peer.test>", "=?ISO-8859-1?Q?Caf=E9_cr=E8me?=")
        ),
    );
    // 3: a base64 UTF-8 body, and a sender with an encoded display name.
    deliver(
        &node,
        &format!(
            "{}Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            head("=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@peer.test>", "plain subject"),
            b64("Die Straße der Zebrafische.\r\n")
        ),
    );
    // 4: multipart: text, HTML alternative, and a base64 attachment whose decoded and encoded
    // text must both stay out of BODY matches.
    let attachment = b64("hiddenword inside the attachment");
    deliver(
        &node,
        &format!(
            "{}Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n\
             --outer\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n\
             --alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the attachment.\r\n\
             --alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hypertext <b>marmalade</b></p>\r\n\
             --alt--\r\n\
             --outer\r\nContent-Type: application/octet-stream; name=\"x.bin\"\r\n\
             Content-Disposition: attachment; filename=\"x.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             {attachment}\r\n--outer--\r\n",
            head("Sender <sender@peer.test>", "with attachment")
        ),
    );
    // 5: larger than one 64 KiB store chunk, the word to find at the end.
    let filler = "filler line of the large message, nothing to see\r\n".repeat(4000);
    deliver(
        &node,
        &format!(
            "{}Content-Type: text/plain\r\n\r\n{filler}needle at the end\r\n",
            head("Sender <sender@peer.test>", "big one")
        ),
    );
    let script = format!(
        r#"
ATTACHMENT = {attachment:?}
m = login('alice@example.test')
assert 'ESEARCH' in m.capabilities, m.capabilities
m.select('INBOX')
def search(*keys, charset=None, literal=None):
    if literal is not None:
        m.literal = literal
    typ, data = m.search(charset, *keys)
    assert typ == 'OK', (keys, typ, data)
    return data[0].decode().split()
def expect(got, want):
    assert got == want, (got, want)
expect(search('ALL'), ['1', '2', '3', '4', '5'])
# RFC 2047 subjects and names, case-insensitive, found by their decoded text.
expect(search('SUBJECT', 'aus'), ['1'])
expect(search('SUBJECT', charset='UTF-8', literal='grüße'.encode()), ['1'])
expect(search('SUBJECT', charset='UTF-8', literal='CAFÉ CRÈME'.encode()), ['2'])
# The raw encoded words, base64 bodies and attachments are not what is searched.
expect(search('SUBJECT', '"=?UTF-8?B?"'), [])
expect(search('FROM', charset='UTF-8', literal='jürgen müller'.encode()), ['3'])
expect(search('FROM', 'jm@peer.test'), ['3'])
# Decoded bodies: quoted-printable ISO-8859-1 (soft line breaks joined), base64 UTF-8, HTML.
expect(search('BODY', charset='UTF-8', literal='café crème'.encode()), ['2'])
expect(search('BODY', '"softbreak joined"'), ['2'])
expect(search('BODY', charset='ISO-8859-1', literal='prêt'.encode('latin-1')), ['2'])
expect(search('BODY', charset='UTF-8', literal='straße der zebra'.encode()), ['3'])
expect(search('BODY', 'marmalade'), ['4'])
expect(search('BODY', 'hiddenword'), [])
expect(search('BODY', ATTACHMENT[:12]), [])
expect(search('TEXT', 'zebrafische'), ['3'])
expect(search('TEXT', charset='UTF-8', literal='jürgen'.encode()), ['3'])
expect(search('TEXT', '"see the attachment"'), ['4'])
expect(search('OR', 'BODY', 'marmalade', 'SUBJECT', 'aus'), ['1', '4'])
expect(search('NOT', 'BODY', 'zebrafische', 'NOT', 'SUBJECT', 'aus'), ['2', '4', '5'])
# A header search reads only the chunks that hold the header; BODY reads them all.
expect(search('SUBJECT', '"big one"'), ['5'])
expect(search('BODY', '"needle at the end"'), ['5'])
expect(search('LARGER', '100000'), ['5'])
# An unknown charset is NO [BADCHARSET ...] (RFC 9051 §6.4.4).
typ, data = m.search('X-NO-SUCH', 'BODY', 'x')
assert typ == 'NO' and b'[BADCHARSET' in data[0], (typ, data)
# UID SEARCH, and ESEARCH (RFC 4731).
m.store('2,4', '+FLAGS', '(\\Flagged)')
typ, data = m.uid('SEARCH', 'FLAGGED')
assert data == [b'2 4'], data
typ, data = m._simple_command('UID', 'SEARCH', 'RETURN', '(MIN MAX COUNT ALL)', 'FLAGGED')
assert typ == 'OK', data
typ, data = m._untagged_response(typ, data, 'ESEARCH')
assert data[0].endswith(b'UID MIN 2 MAX 4 COUNT 2 ALL 2,4'), data
print('ok')
"#
    );
    let out = python_imap(&node, &script);
    assert_eq!(out.trim(), "ok", "{out}");
}
