//! The authenticated replication link (issue 8, slice 3 of docs/design/replication-plan.md):
//! two real primaries on loopback find each other over `listen.sync`, `postern sync status`
//! reports them, a stopped peer shows as down and comes back by itself, a config mismatch is
//! refused loudly, and a client without a valid proof for *this* TLS session (wrong secret,
//! a proof from another session, an unknown node, garbage, plain text) gets nothing but a closed
//! connection: no AuthOk, no HELLO.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::metrics;
use common::dns::TestDns;
use common::{wait_for, Node};
use postern::cluster::SYNC;
use postern::config::Secret;
use postern::sync::frame::{self, Frame, FrameError, MAX_FRAME};

const SECRET: &str = "the sync test cluster secret, shared by both nodes";

struct Files {
    dir: tempfile::TempDir,
    _dns: TestDns,
    a_port: u16,
    b_port: u16,
}

/// `a.toml` and `b.toml` in one directory: the same cluster of primaries `a` and `b`, except
/// that `b_extra` is appended to B's copy (to make the configs differ).
fn cluster(b_extra: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("cluster.key"), format!("{SECRET}\n")).unwrap();
    let dns = TestDns::start("");
    let (a_port, b_port) = (common::pebble::free_port(), common::pebble::free_port());
    let hash = postern::auth::hash_password(common::PASSWORD);
    let node = |name: &str, port: u16| {
        format!(
            "[nodes.{name}]\nhostname = \"{name}.example.test\"\nrole = \"primary\"\ndata_dir = \"{name}-data\"\n\
             listen.smtp = [\"127.0.0.1:0\"]\nlisten.imaps = [\"127.0.0.1:0\"]\nlisten.metrics = [\"127.0.0.1:0\"]\n\
             listen.sync = [\"127.0.0.1:{port}\"]\nsync_address = \"127.0.0.1:{port}\"\n\n"
        )
    };
    let text = format!(
        "[cluster]\ndomains = [\"example.test\"]\nsecret_file = \"cluster.key\"\n\n{}{}\
         [sync]\n\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[dns]\nnameservers = [\"{}\"]\n\n\
         [users.\"alice@example.test\"]\npassword = \"{hash}\"\n",
        node("a", a_port),
        node("b", b_port),
        dns.addr()
    );
    std::fs::write(dir.path().join("a.toml"), &text).unwrap();
    std::fs::write(dir.path().join("b.toml"), format!("{text}{b_extra}")).unwrap();
    Files { dir, _dns: dns, a_port, b_port }
}

impl Files {
    fn config(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }
}

/// `postern sync status` of a node: (exit 0, output).
fn status(node: &Node) -> (bool, String) {
    node.cli(&["sync", "status"])
}

/// The state column of `peer`'s line.
fn peer_line(text: &str, peer: &str) -> Option<String> {
    text.lines().find(|l| l.split_whitespace().next() == Some(peer)).map(str::to_string)
}

fn wait_state(node: &Node, peer: &str, state: &str, exit_ok: bool, timeout: Duration) -> String {
    let mut last = String::new();
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let (ok, text) = status(node);
        if ok == exit_ok && peer_line(&text, peer).is_some_and(|l| l.contains(state)) {
            return text;
        }
        last = text;
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{peer} never became {state:?} (exit ok {exit_ok}); last status:\n{last}\nlog:\n{}", node.log());
}

#[test]
fn two_primaries_link_report_drop_and_reconnect() {
    let files = cluster("");
    let a = Node::start_named(&files.config("a"), "a");
    let mut b = Node::start_named(&files.config("b"), "b");
    assert!(a.listening.iter().any(|(p, addr)| p == "sync" && addr.port() == files.a_port), "{:?}", a.listening);

    let text = wait_state(&a, "b", "connected", true, Duration::from_secs(30));
    let line = peer_line(&text, "b").unwrap();
    assert!(line.contains("match"), "{text}");
    assert!(text.contains("config fingerprint "), "{text}");
    wait_state(&b, "a", "connected", true, Duration::from_secs(30));
    // Both nodes print the same fingerprint.
    let fp = |t: &str| {
        t.lines().find(|l| l.contains("config fingerprint")).unwrap().split(' ').next_back().unwrap().to_string()
    };
    assert_eq!(fp(&status(&a).1), fp(&status(&b).1));
    let m = metrics(&a);
    assert!(m.contains("postern_sync_peer_connected{peer=\"b\"} 1\n"), "{m}");
    assert!(m.contains("postern_sync_config_mismatch{peer=\"b\"} 0\n"), "{m}");
    assert!(!a.log().contains(SECRET) && !b.log().contains(SECRET));

    // B stops: A sees the link end at once (no need to wait for the heartbeat).
    b.stop();
    let text = wait_state(&a, "b", "down", false, Duration::from_secs(20));
    assert!(metrics(&a).contains("postern_sync_peer_connected{peer=\"b\"} 0\n"), "{text}");

    // B comes back: both links come up again without help.
    b.launch();
    wait_state(&a, "b", "connected", true, Duration::from_secs(60));
    wait_state(&b, "a", "connected", true, Duration::from_secs(30));
}

/// A peer that is frozen (SIGSTOP: its sockets stay open, it sends nothing) is marked down by
/// the heartbeat within the silence limit, and the links come back once it runs again.
#[test]
fn a_silent_peer_is_marked_down_and_comes_back() {
    let files = cluster("");
    let a = Node::start_named(&files.config("a"), "a");
    let b = Node::start_named(&files.config("b"), "b");
    wait_state(&a, "b", "connected", true, Duration::from_secs(30));
    let pid = b.pid().unwrap() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = std::time::Instant::now();
    let text = wait_state(&a, "b", "down", false, Duration::from_secs(30));
    let took = frozen.elapsed();
    assert!(took >= Duration::from_secs(9), "down after {took:?}, before the silence limit:\n{text}");
    assert!(a.log().contains("silent for 15s"), "{}", a.log());
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_state(&a, "b", "connected", true, Duration::from_secs(60));
    wait_state(&b, "a", "connected", true, Duration::from_secs(30));
}

#[test]
fn a_config_mismatch_stops_the_link_loudly() {
    let hash = postern::auth::hash_password(common::PASSWORD);
    let files = cluster(&format!("\n[users.\"bob@example.test\"]\npassword = \"{hash}\"\n"));
    let a = Node::start_named(&files.config("a"), "a");
    let b = Node::start_named(&files.config("b"), "b");
    let text = wait_state(&a, "b", "config mismatch", false, Duration::from_secs(30));
    assert!(peer_line(&text, "b").unwrap().contains("MISMATCH"), "{text}");
    assert!(text.contains("differs"), "{text}");
    wait_state(&b, "a", "config mismatch", false, Duration::from_secs(30));
    assert!(metrics(&a).contains("postern_sync_config_mismatch{peer=\"b\"} 1\n"));
    assert!(metrics(&b).contains("postern_sync_peer_connected{peer=\"a\"} 0\n"));
    wait_for("the mismatch in the log", Duration::from_secs(10), || a.log().contains("config mismatch"));
    // Logged once per minute per peer, not at every redial.
    std::thread::sleep(Duration::from_secs(3));
    let logged = a.log().matches("sync peer=b config mismatch").count();
    assert_eq!(logged, 1, "{}", a.log());
    // The diallers back off (100 ms doubling) rather than redialling at once after each refusal.
    let accepted = a.log().matches("sync peer=b address=127.0.0.1 authenticated").count();
    assert!((1..=15).contains(&accepted), "{accepted} connections from b:\n{}", a.log());
}

/// What a connection gave back after our last frame.
#[derive(Debug, PartialEq)]
enum Answer {
    Frame(Frame),
    /// Closed (EOF or reset) without a frame.
    Closed,
    /// Still open, nothing said.
    Silent,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(addr: SocketAddr) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(postern::sync::net::client_config().unwrap());
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    connector.connect(name, tcp).await.expect("the TLS handshake itself is open to anyone")
}

fn binding(tls: &Tls) -> [u8; 32] {
    SYNC.binding(tls.get_ref().1).unwrap()
}

async fn answer(tls: &mut Tls, wait: Duration) -> Answer {
    match tokio::time::timeout(wait, frame::read(tls, MAX_FRAME)).await {
        Err(_) => Answer::Silent,
        Ok(Ok(f)) => Answer::Frame(f),
        Ok(Err(FrameError::Io(_))) => Answer::Closed,
        Ok(Err(e)) => panic!("the server sent something that is no frame: {e}"),
    }
}

async fn auth(tls: &mut Tls, node: &str, mac: [u8; 32]) -> Answer {
    frame::write(tls, &Frame::Auth { node: node.into(), mac: mac.to_vec() }).await.unwrap();
    answer(tls, Duration::from_secs(10)).await
}

#[test]
fn only_a_proof_for_this_session_gets_an_answer() {
    let files = cluster("");
    // Only A runs: the test plays B.
    let a = Node::start_named(&files.config("a"), "a");
    let addr: SocketAddr = format!("127.0.0.1:{}", files.a_port).parse().unwrap();
    let secret = Secret(SECRET.into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The right proof: AuthOk with the server's proof, then HELLO from a (a positive
        // control: the client below speaks the protocol correctly).
        let mut good = connect(addr).await;
        assert_eq!(answer(&mut good, Duration::from_millis(500)).await, Answer::Silent, "server speaks first");
        let b = binding(&good);
        match auth(&mut good, "b", SYNC.client_tag(&secret, "b", &b)).await {
            Answer::Frame(Frame::AuthOk { mac }) => assert!(SYNC.check_server(&secret, "b", &b, &mac)),
            other => panic!("expected AuthOk, got {other:?}"),
        }
        match answer(&mut good, Duration::from_secs(10)).await {
            Answer::Frame(Frame::Hello { node, proto, .. }) => assert_eq!((node.as_str(), proto), ("a", 1)),
            other => panic!("expected HELLO, got {other:?}"),
        }
        drop(good);

        // A wrong secret.
        let mut tls = connect(addr).await;
        let b = binding(&tls);
        let wrong = Secret("another secret of sufficient length".into());
        assert_eq!(auth(&mut tls, "b", SYNC.client_tag(&wrong, "b", &b)).await, Answer::Closed);

        // A proof captured on one session and replayed on another.
        let first = connect(addr).await;
        let captured = SYNC.client_tag(&secret, "b", &binding(&first));
        let mut second = connect(addr).await;
        assert_eq!(auth(&mut second, "b", captured).await, Answer::Closed);
        drop(first);

        // The SMTP hop's proof (other labels) for this very session.
        let mut tls = connect(addr).await;
        let smtp = postern::cluster::SMTP.client_tag(&secret, "b", &binding(&tls));
        assert_eq!(auth(&mut tls, "b", smtp).await, Answer::Closed);

        // A node that is not a peer, with a proof that is otherwise right.
        let mut tls = connect(addr).await;
        let b = binding(&tls);
        assert_eq!(auth(&mut tls, "mallory", SYNC.client_tag(&secret, "mallory", &b)).await, Answer::Closed);

        // Garbage, then an oversized length, inside TLS.
        for bytes in [&[0, 0, 0, 3, 0xff, 0xff, 0xff][..], &[0x7f, 0xff, 0xff, 0xff]] {
            let mut tls = connect(addr).await;
            tokio::io::AsyncWriteExt::write_all(&mut tls, bytes).await.unwrap();
            tokio::io::AsyncWriteExt::flush(&mut tls).await.unwrap();
            assert_eq!(answer(&mut tls, Duration::from_secs(10)).await, Answer::Closed);
        }
    });

    // Plain text: an Auth frame without TLS gets at most a TLS alert, then the close.
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&frame::encode(&Frame::Auth { node: "b".into(), mac: vec![0; 32] })).unwrap();
    let mut got = Vec::new();
    // EOF, or a reset (the server closed with our bytes unread); a timeout means it stayed open.
    let closed = match tcp.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    assert!(closed, "the connection stayed open");
    assert!(got.is_empty() || (got[0] == 0x15 && got.len() < 16), "not a bare TLS alert: {got:?}");

    let log = a.log();
    assert!(log.matches("sync auth failed").count() >= 5, "{log}");
    assert!(!log.contains(SECRET), "the secret reached the log");
    let (ok, text) = status(&a);
    assert!(!ok && peer_line(&text, "b").is_some_and(|l| l.contains("down")), "{text}");
}

/// The dialler's side of mutual authentication: an impostor at B's address that does not hold
/// the secret (here it reflects A's own proof back, the best it can do) gets A's proof, which
/// is useless to it, and then nothing: no HELLO, a closed connection, an error in A's log.
#[test]
fn the_dialler_closes_on_a_wrong_server_proof() {
    use tokio::io::AsyncReadExt;
    let files = cluster("");
    let listener = std::net::TcpListener::bind(("127.0.0.1", files.b_port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let a = Node::start_named(&files.config("a"), "a");
    let secret = Secret(SECRET.into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["b.example.test".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.unwrap().unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let binding = SYNC.binding(tls.get_ref().1).unwrap();
        let Frame::Auth { node, mac } = frame::read(&mut tls, MAX_FRAME).await.unwrap() else {
            panic!("A did not start with Auth");
        };
        // A's proof is right for this session (and only for it).
        assert_eq!(node, "a");
        assert!(SYNC.check_client(&secret, "a", &binding, &mac));
        frame::write(&mut tls, &Frame::AuthOk { mac }).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "A kept the connection open");
        assert!(rest.is_empty(), "A sent {} bytes after a wrong proof", rest.len());
    });
    wait_for("the wrong proof in A's log", Duration::from_secs(10), || a.log().contains("answered with a wrong proof"));
    let (ok, text) = status(&a);
    assert!(!ok && peer_line(&text, "b").is_some_and(|l| l.contains("down")), "{text}");
}
