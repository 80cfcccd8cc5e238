#!/usr/bin/env python3
"""Mail through the installed Debian package, for scripts/package-test.sh.

    package-test-mail.py deliver TOKEN   # start the installed node, deliver one message, stop it
    package-test-mail.py read TOKEN      # start it again, read that message back over IMAPS, stop

Each step writes /etc/postern/postern.toml (a one-node cluster on 127.0.0.1 with kernel-chosen
ports, data_dir /var/lib/postern, DNS answered NXDOMAIN by a resolver in this process), runs
/usr/bin/postern serve as the `postern` user with the unit's umask, as systemd would, and stops it
with SIGTERM, expecting exit status 0. The user's password hash comes from $POSTERN_TEST_HASH and
the password from $POSTERN_TEST_PASSWORD.
"""

import imaplib
import os
import queue
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time

CONFIG = "/etc/postern/postern.toml"
USER = "alice@pkgtest.example"
MARKER = "# written by scripts/package-test-mail.py"
LOG = os.environ.get("POSTERN_TEST_LOG", "/tmp/postern-package-test.log")


def nxdomain_server():
    """A UDP DNS server answering every question with NXDOMAIN at once; returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve():
        while True:
            query, peer = sock.recvfrom(4096)
            if len(query) < 12:
                continue
            # Same id, QR + opcode of the query + RD copied, RA, RCODE 3; the question echoed.
            flags = 0x8000 | (query[2] & 0x79) << 8 | 0x0080 | 3
            answer = query[:2] + flags.to_bytes(2, "big") + query[4:6] + b"\0\0\0\0\0\0"
            sock.sendto(answer + question(query), peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


def question(query):
    """The first question section of a query (name, type, class)."""
    i = 12
    while i < len(query) and query[i] != 0:
        i += query[i] + 1
    return query[12 : i + 5]


def write_config(dns_port):
    hash_ = os.environ["POSTERN_TEST_HASH"]
    text = f"""{MARKER}
[cluster]
domains = ["pkgtest.example"]

[nodes.pkgtest]
hostname = "mail.pkgtest.example"
data_dir = "/var/lib/postern"
listen.smtp = ["127.0.0.1:0"]
listen.imaps = ["127.0.0.1:0"]

[users."{USER}"]
password = "{hash_}"

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"
"""
    with open(CONFIG, "w") as f:
        f.write(text)


class Node:
    def __init__(self):
        write_config(nxdomain_server())
        self.stderr = open(LOG, "ab")
        self.proc = subprocess.Popen(
            ["/usr/bin/postern", "serve", "--config", CONFIG],
            user="postern",
            group="postern",
            extra_groups=[],
            umask=0o027,
            cwd="/var/lib/postern",
            env={"PATH": "/usr/bin:/bin", "HOME": "/var/lib/postern", "POSTERN_LOG": "info"},
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        self.addr = {}
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.fail("the installed postern did not print `postern ready` within 60s")
            if line.startswith("listening "):
                _, proto, addr = line.split()
                host, port = addr.rsplit(":", 1)
                self.addr[proto] = (host, int(port))
            elif line.startswith("postern ready"):
                break
            elif self.proc.poll() is not None:
                self.fail(f"the installed postern exited with {self.proc.returncode}")

    def fail(self, message):
        self.proc.kill()
        self.stderr.flush()
        with open(LOG, errors="replace") as f:
            log = f.read()[-4000:]
        sys.exit(f"package-test-mail: {message}\n--- postern's stderr ---\n{log}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("the installed postern did not stop within 60s of SIGTERM")
        if status != 0:
            self.fail(f"the installed postern exited with {status} after SIGTERM")


def deliver(token):
    node = Node()
    host, port = node.addr["smtp"]
    message = (
        f"From: sender@elsewhere.example\r\nTo: {USER}\r\nSubject: package test {token}\r\n"
        f"Message-ID: <{token}@elsewhere.example>\r\n\r\nbody {token}\r\n"
    )
    with smtplib.SMTP(host, port, local_hostname="client.elsewhere.example", timeout=60) as smtp:
        refused = smtp.sendmail("sender@elsewhere.example", [USER], message)
        if refused:
            node.fail(f"recipients refused: {refused}")
    node.stop()
    print(f"delivered the message {token} to {USER}")


def read(token):
    node = Node()
    host, port = node.addr["imaps"]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=60)
    imap.login(USER, os.environ["POSTERN_TEST_PASSWORD"])
    _, data = imap.select("INBOX", readonly=True)
    found = False
    for num in range(1, int(data[0]) + 1):
        _, parts = imap.fetch(str(num), "(BODY.PEEK[])")
        body = b"".join(p[1] for p in parts if isinstance(p, tuple))
        found = found or f"body {token}".encode() in body
    imap.logout()
    node.stop()
    if not found:
        sys.exit(f"package-test-mail: message {token} not found in INBOX of {USER}")
    print(f"read the message {token} back over IMAPS")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("deliver", "read"):
        sys.exit(__doc__)
    {"deliver": deliver, "read": read}[sys.argv[1]](sys.argv[2])
