#!/usr/bin/env python3
"""Append the corpus to a private Dovecot and record its raw FETCH responses.

Called by dovecot-reference.sh (which starts and stops the private Dovecot);
see README.md for the output format.  Uses a minimal socket client instead of
imaplib so that responses are recorded byte for byte, literals included.
"""
import argparse
import os
import re
import socket
import sys

TIMING = re.compile(rb' \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)')
LITERAL_AT_END = re.compile(rb'\{(\d+)\+?\}\r\n$')
INTERNALDATE = '"01-Jan-2025 00:00:00 +0000"'


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=30)
        self.buf = b''
        self.n = 0
        self.greeting = self.read_response()

    def _line(self):
        while b'\r\n' not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError('server closed the connection')
            self.buf += data
        i = self.buf.index(b'\r\n') + 2
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def _bytes(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError('server closed the connection')
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self):
        """One logical response line: its literals are read inline."""
        out = self._line()
        while True:
            m = LITERAL_AT_END.search(out)
            if not m:
                return out
            out += self._bytes(int(m.group(1)))
            out += self._line()

    def command(self, cmd, literal=None):
        """Send cmd; return (untagged/continuation responses, tagged line)."""
        self.n += 1
        tag = b'R%04d' % self.n
        if literal is None:
            self.sock.sendall(tag + b' ' + cmd + b'\r\n')
        else:
            self.sock.sendall(tag + b' ' + cmd + b' {%d}\r\n' % len(literal))
            cont = self.read_response()
            if not cont.startswith(b'+'):
                raise RuntimeError('no continuation: %r' % cont)
            self.sock.sendall(literal + b'\r\n')
        lines = []
        while True:
            line = self.read_response()
            if line.startswith(tag + b' '):
                return lines, line[len(tag) + 1:]
            lines.append(line)


# ---- a small parser for the BODYSTRUCTURE response ------------------------

def parse_sexp(data, pos):
    """Parse one item starting at data[pos]; return (value, newpos)."""
    while data[pos:pos + 1] == b' ':
        pos += 1
    c = data[pos:pos + 1]
    if c == b'(':
        pos += 1
        items = []
        while True:
            while data[pos:pos + 1] == b' ':
                pos += 1
            if data[pos:pos + 1] == b')':
                return items, pos + 1
            v, pos = parse_sexp(data, pos)
            items.append(v)
    if c == b'"':
        pos += 1
        out = b''
        while data[pos:pos + 1] != b'"':
            if data[pos:pos + 1] == b'\\':
                pos += 1
            out += data[pos:pos + 1]
            pos += 1
        return out, pos + 1
    if c == b'{':
        m = re.compile(rb'\{(\d+)\}\r\n').match(data, pos)
        n = int(m.group(1))
        start = m.end()
        return data[start:start + n], start + n
    m = re.compile(rb'[^ ()\r\n]+').match(data, pos)
    atom = m.group(0)
    return (None if atom.upper() == b'NIL' else atom), m.end()


def bodystructure(resp):
    i = resp.index(b'FETCH (') + len(b'FETCH ')
    items, _ = parse_sexp(resp, i)
    for k in range(0, len(items), 2):
        if isinstance(items[k], bytes) and items[k].upper() == b'BODYSTRUCTURE':
            return items[k + 1]
    raise ValueError('no BODYSTRUCTURE in %r' % resp)


def is_multipart(b):
    return isinstance(b[0], list)


def is_rfc822(b):
    return (not is_multipart(b) and isinstance(b[0], bytes) and isinstance(b[1], bytes)
            and b[0].lower() == b'message' and b[1].lower() in (b'rfc822', b'global')
            and len(b) > 8 and isinstance(b[8], list))


def join(path, i):
    return '%s.%d' % (path, i) if path else str(i)


def walk_multipart(b, path):
    i = 0
    for child in b:
        if not isinstance(child, list):
            break
        i += 1
        p = join(path, i)
        yield p, child
        if is_multipart(child):
            yield from walk_multipart(child, p)
        elif is_rfc822(child):
            yield from walk_message(child[8], p)


def walk_message(b, path):
    """The parts of a message whose body is b, numbered below path."""
    if is_multipart(b):
        yield from walk_multipart(b, path)
    else:
        p = join(path, 1)
        yield p, b
        if is_rfc822(b):
            yield from walk_message(b[8], p)


# ---------------------------------------------------------------------------

def commands_for(uid, parts):
    u = b'UID FETCH %d ' % uid
    cmds = [u + x for x in [
        b'(BODYSTRUCTURE)',
        b'(BODY)',
        b'(ENVELOPE)',
        b'(RFC822.SIZE)',
        b'(BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])',
        b'(BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED RETURN-PATH)])',
        b'(BODY.PEEK[HEADER])',
        b'(BODY.PEEK[TEXT])',
        b'(BODY.PEEK[]<0.100>)',
        b'(BODY.PEEK[TEXT]<5.40>)',
        b'(BODY.PEEK[]<100000.10>)',
        b'(BODY.PEEK[1]<0.20>)',
    ]]
    for path, b in parts:
        p = path.encode()
        cmds.append(u + b'(BODY.PEEK[%s])' % p)
        cmds.append(u + b'(BODY.PEEK[%s.MIME])' % p)
        if is_rfc822(b):
            cmds.append(u + b'(BODY.PEEK[%s.HEADER])' % p)
            cmds.append(u + b'(BODY.PEEK[%s.TEXT])' % p)
            cmds.append(u + b'(BODY.PEEK[%s.HEADER.FIELDS (FROM SUBJECT)])' % p)
        elif not is_multipart(b):
            cmds.append(u + b'(BINARY.SIZE[%s])' % p)
            cmds.append(u + b'(BINARY.PEEK[%s])' % p)
    return cmds


def uidlist(maildir):
    """uid -> maildir base file name, from dovecot-uidlist."""
    out = {}
    with open(os.path.join(maildir, 'dovecot-uidlist'), 'rb') as f:
        next(f)
        for line in f:
            line = line.rstrip(b'\n')
            uid = int(line.split(b' ', 1)[0])
            out[uid] = line.split(b':', 1)[1].decode()
    return out


def find_stored(maildir, base):
    for sub in ('cur', 'new'):
        for name in os.listdir(os.path.join(maildir, sub)):
            if name.split(':', 1)[0] == base.split(':', 1)[0]:
                return os.path.join(maildir, sub, name)
    raise FileNotFoundError(base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--port', type=int, required=True)
    ap.add_argument('--messages', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--maildir', required=True)
    args = ap.parse_args()

    names = sorted(n for n in os.listdir(args.messages) if n.endswith('.eml'))
    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):
        if old.endswith('.txt'):
            os.unlink(os.path.join(args.out, old))

    c = Client(args.port)
    _, st = c.command(b'LOGIN test test')
    assert st.startswith(b'OK'), st
    caps, _ = c.command(b'CAPABILITY')
    with open(os.path.join(args.out, 'CAPABILITY'), 'wb') as f:
        f.write(c.greeting)
        f.writelines(caps)
    _, st = c.command(b'SELECT INBOX')
    assert st.startswith(b'OK'), st

    originals = {}
    for i, name in enumerate(names, 1):
        with open(os.path.join(args.messages, name), 'rb') as f:
            data = f.read()
        originals[i] = (name, data)
        _, st = c.command(b'APPEND INBOX () ' + INTERNALDATE.encode(), literal=data)
        m = re.search(rb'\[APPENDUID \d+ (\d+)\]', st)
        if not st.startswith(b'OK') or not m or int(m.group(1)) != i:
            sys.exit('APPEND of %s: %r' % (name, st))
    _, st = c.command(b'NOOP')

    # What Dovecot stored on disk, compared with what was appended.
    uids = uidlist(args.maildir)
    with open(os.path.join(args.out, 'STORAGE'), 'w') as rep:
        rep.write('# uid name appended-bytes stored-bytes bare-LF-in-input stored==input-with-CRLF->LF '
                  'maildir-S= maildir-W=\n')
        for uid in sorted(originals):
            name, data = originals[uid]
            path = find_stored(args.maildir, uids[uid])
            with open(path, 'rb') as f:
                stored = f.read()
            s = re.search(r',S=(\d+)', os.path.basename(path))
            w = re.search(r',W=(\d+)', os.path.basename(path))
            bare_lf = bool(re.search(rb'(?<!\r)\n', data))
            rep.write('%d %s %d %d %s %s %s %s\n' % (
                uid, name, len(data), len(stored), 'yes' if bare_lf else 'no',
                'yes' if stored == data.replace(b'\r\n', b'\n') else 'NO',
                s.group(1) if s else '-', w.group(1) if w else '-'))

    for uid in sorted(originals):
        name, _ = originals[uid]
        lines, st = c.command(b'UID FETCH %d (BODYSTRUCTURE)' % uid)
        bs = bodystructure(lines[0])
        parts = list(walk_message(bs, None))
        with open(os.path.join(args.out, name[:-4] + '.txt'), 'wb') as f:
            for cmd in commands_for(uid, parts):
                lines, st = c.command(cmd)
                f.write(b'>> ' + cmd + b'\r\n')
                f.writelines(lines)
                if not st.startswith(b'OK'):
                    f.write(b'TAG ' + TIMING.sub(b'', st))
        print('%s: %d parts' % (name, len(parts)))

    c.command(b'LOGOUT')


if __name__ == '__main__':
    main()
