//! The inactivity timer (RFC 9051 §5.4), with `[imap] idle_timeout` shortened to 2 s so the
//! test runs quickly: a silent session is logged out with BYE; a client that re-issues IDLE
//! before the timer runs out (as real clients do every 29 minutes) stays connected.

mod common;

use common::*;

#[test]
fn silent_sessions_are_logged_out_and_reissued_idle_is_kept() {
    let node = Node::start(Setup { extra: "[imap]\nidle_timeout = \"2s\"\n".into(), ..Setup::default() });
    let out = python_imap(
        &node,
        r#"
import socket, time
def raw():
    s = tls().wrap_socket(socket.create_connection((HOST, PORT)), server_hostname='localhost')
    f = s.makefile('rb')
    assert f.readline().startswith(b'* OK')
    s.sendall(b'a LOGIN alice@example.test %s\r\n' % PASSWORD.encode())
    while not f.readline().startswith(b'a OK'):
        pass
    return s, f

# 1. Logged in, then silent: BYE after about 2 s, then the connection closes.
s, f = raw()
t0 = time.monotonic()
line = f.readline()
waited = time.monotonic() - t0
print('silent', line.strip().decode(), f.readline() == b'', 1.5 < waited < 6)

# 2. IDLE re-issued every 1.5 s for 6 s (three timer lengths): still served.
s, f = raw()
s.sendall(b'b SELECT INBOX\r\n')
while not f.readline().startswith(b'b OK'):
    pass
for i in range(4):
    s.sendall(b'i%d IDLE\r\n' % i)
    assert f.readline().startswith(b'+'), i
    time.sleep(1.5)
    s.sendall(b'DONE\r\n')
    line = f.readline()
    while line.startswith(b'* '):
        line = f.readline()
    assert line.startswith(b'i%d OK' % i), line
s.sendall(b'n NOOP\r\n')
print('reissued', f.readline().strip().decode())

# 3. IDLE never re-issued: the timer runs during IDLE too.
s.sendall(b'j IDLE\r\n')
assert f.readline().startswith(b'+')
t0 = time.monotonic()
line = f.readline()
print('idle', line.strip().decode(), 1.5 < time.monotonic() - t0 < 6)
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "silent * BYE Autologout; idle for too long True True", "{out}");
    assert_eq!(lines[1], "reissued n OK NOOP completed", "{out}");
    assert!(lines[2].starts_with("idle * BYE") && lines[2].ends_with("True"), "{out}");
    assert!(node.log().contains("reason=timeout"), "{}", node.log());
}
