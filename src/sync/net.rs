//! The replication link over `listen.sync` (docs/design/replication-plan.md §3.1): a listener
//! per address and a dialler per peer, TLS 1.3 only, the cluster secret bound to the session
//! (`crate::cluster::SYNC`), then HELLO with the config fingerprint and heartbeats.
//!
//! Authentication order: the client sends `Auth{node, mac}` first; the server sends nothing but
//! the TLS handshake until that proof verifies for a node in its peer list, then answers with its
//! own proof, which the client checks before it says anything else. Someone without the secret
//! learns only that the port speaks TLS. The dialler accepts any certificate: the secret, not
//! the WebPKI, authenticates peers (as `TlsPolicy::Cluster` does for the SMTP hop); handshake
//! signatures are still checked, so the exporter is bound to a key the server holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::durable::Replication;
use super::engine::{self, Msg, Replica};
use super::frame::{self, Frame, FrameError, MAX_AUTH_FRAME, MAX_FRAME, PROTO};
use super::merge::Guid;
use super::projection::Report;
use super::replica::StoreReplica;
use super::status::{Direction, SyncStatus};
use crate::auth::AuthLimiter;
use crate::cluster::SYNC;
use crate::config::{Config, Node, Role, Secret};
use crate::net::ConnLimiter;
use crate::store::Store;
use crate::tls::CertStore;

/// ALPN of the link, so a sync port is never mistaken for another TLS service and back.
pub const ALPN: &[u8] = b"postern-sync/1";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect to `Auth` verified (server) or `AuthOk` received (client), and HELLO.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A peer that sent nothing for this long is down (three missed pings).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// One skew warning per link when the peer's clock is further off than this.
const SKEW_WARNING: Duration = Duration::from_secs(60);
/// How often a pushing connection looks for new durable records (plan §3.3: a change reaches
/// the peer within a second of its commit).
const PUMP_INTERVAL: Duration = Duration::from_millis(200);

/// Per peer, per account: the peer's last report (UIDNEXT and held messages per mailbox), which
/// the allocator numbers from.
type PeerReports = BTreeMap<String, BTreeMap<String, BTreeMap<Guid, Report>>>;

/// Everything one node's link tasks share.
struct Link {
    node: String,
    secret: Secret,
    peers: Vec<String>,
    fingerprint: [u8; 32],
    status: Arc<SyncStatus>,
    auth_limiter: Arc<AuthLimiter>,
    conns: ConnLimiter,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    store: Arc<Store>,
    reports: Mutex<PeerReports>,
    /// Acked vectors go there (durable delivery waits on them); its kicks wake the pushers.
    replication: Arc<Replication>,
    /// `[sync] anti_entropy_interval`: how often a pushing link compares every account again
    /// (it also does on every connection).
    anti_entropy_interval: Duration,
    /// Per peer, wakes its dialler from its backoff: a peer that just connected to us is up, so
    /// our push connection to it (what catches it up) should not wait up to `BACKOFF_MAX`.
    redial: BTreeMap<String, Arc<tokio::sync::Notify>>,
}

/// Binds the node's sync listeners (before the node says it is ready, like every listener).
/// Empty when replication is off or this node does not take part (a backup).
pub fn bind(config: &Config, node: &Node) -> Result<Vec<TcpListener>> {
    if !takes_part(config, node) {
        if !node.listen.sync.is_empty() {
            tracing::warn!("listen.sync is set but the config has no [sync] table: replication is off");
        }
        return Ok(Vec::new());
    }
    node.listen
        .sync
        .iter()
        .map(|addr| crate::net::bind(*addr).with_context(|| format!("listening on {addr} (sync)")))
        .collect()
}

fn takes_part(config: &Config, node: &Node) -> bool {
    config.sync.is_some() && node.role == Role::Primary
}

/// Starts the listeners' accept loops and one dialler per peer. `replication` is `None` when
/// replication is off on this node (`Replication::new`).
pub fn start(
    config: &Config,
    node: &Node,
    listeners: Vec<TcpListener>,
    certs: Arc<CertStore>,
    auth_limiter: Arc<AuthLimiter>,
    replication: Option<Arc<Replication>>,
) -> Result<()> {
    let Some(replication) = replication.filter(|_| takes_part(config, node)) else { return Ok(()) };
    // The loader requires the secret with [sync]; a config built in code might lack it.
    let secret = config.cluster.secret.clone().context("[sync] needs [cluster] secret_file")?;
    let peers = config.sync_peers(&node.name);
    let fingerprint = replication.status().fingerprint();
    let status = replication.status().clone();
    let store = replication.store().clone();
    let link = Arc::new(Link {
        node: node.name.clone(),
        secret,
        peers: peers.clone(),
        fingerprint,
        status: status.clone(),
        auth_limiter,
        conns: ConnLimiter::new(8, 64),
        acceptor: TlsAcceptor::from(server_config(certs)?),
        connector: TlsConnector::from(client_config()?),
        store,
        reports: Mutex::new(BTreeMap::new()),
        replication,
        anti_entropy_interval: config.sync.as_ref().map_or(Duration::from_secs(86400), |s| s.anti_entropy_interval),
        redial: peers.iter().map(|p| (p.clone(), Arc::new(tokio::sync::Notify::new()))).collect(),
    });
    if let Some(sync) = &config.sync {
        tokio::spawn(super::retention::run(link.store.clone(), sync.retention));
    }
    for listener in listeners {
        tokio::spawn(accept_loop(link.clone(), listener));
    }
    let mut dial: BTreeMap<String, (String, String)> = BTreeMap::new();
    for peer in &peers {
        let Some(n) = config.nodes.get(peer) else { continue };
        match config.sync_address(n) {
            Some(address) => {
                dial.insert(peer.clone(), (address, n.hostname.clone()));
            }
            None => tracing::error!("sync peer={peer} has no sync address: not dialling it"),
        }
    }
    for (peer, (address, hostname)) in dial {
        tokio::spawn(dial_loop(link.clone(), peer, address, hostname));
    }
    Ok(())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only: the exporter (RFC 8446 §7.5) is what the proofs are bound to.
fn server_config(certs: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The dialler's TLS: any certificate, TLS 1.3 only. Public for tests that play a peer.
pub fn client_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts whatever certificate the peer shows but checks its handshake signature.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn accept_loop(link: Arc<Link>, listener: TcpListener) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed proto=sync error={e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(guard) = link.conns.acquire(addr.ip()) else { continue };
        let link = link.clone();
        tokio::spawn(async move {
            serve(link, tcp, addr).await;
            drop(guard);
        });
    }
}

/// A node name from the wire, safe to log.
fn shown(name: &str) -> String {
    let mut s: String = name.chars().take(64).collect();
    if s.len() < name.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// The server side of one connection: nothing but TLS until the client's proof verifies.
async fn serve(link: Arc<Link>, tcp: TcpStream, addr: SocketAddr) {
    let ip = addr.ip();
    if link.auth_limiter.blocked(ip, None) {
        tracing::warn!("sync connection refused address={ip} reason=too many failed proofs");
        return;
    }
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("sync tls handshake failed address={ip} error={e}");
            return;
        }
        Err(_) => return,
    };
    let Some(binding) = SYNC.binding(tls.get_ref().1) else { return };
    let claimed = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut tls, MAX_AUTH_FRAME)).await {
        Ok(Ok(Frame::Auth { node, mac })) => Some((node, mac)),
        Ok(Err(FrameError::Io(_))) | Err(_) => return,
        Ok(_) => None,
    };
    let node = match claimed {
        Some((node, mac)) if link.peers.contains(&node) && SYNC.check_client(&link.secret, &node, &binding, &mac) => {
            node
        }
        other => {
            link.auth_limiter.record_failure(ip, None);
            let claim = other.map_or_else(|| "no Auth frame".to_string(), |(n, _)| format!("node={}", shown(&n)));
            tracing::warn!("sync auth failed address={ip} {claim}: wrong proof, unknown node or garbage");
            return;
        }
    };
    let proof = Frame::AuthOk { mac: SYNC.server_tag(&link.secret, &node, &binding).to_vec() };
    if frame::write(&mut tls, &proof).await.is_err() {
        return;
    }
    tracing::info!("sync peer={node} address={ip} authenticated");
    if let Err(reason) = run_link(&link, tls, &node, Direction::In).await {
        link.status.failure(&node, &reason);
    }
}

/// Dials `peer` for ever, with exponential backoff and jitter between attempts.
async fn dial_loop(link: Arc<Link>, peer: String, address: String, hostname: String) {
    let server_name = server_name(&address, &hostname);
    let mut backoff = BACKOFF_MIN;
    loop {
        match dial_once(&link, &peer, &address, server_name.clone()).await {
            // The link was up: start again from the shortest wait.
            Ok(()) => backoff = BACKOFF_MIN,
            Err(reason) => {
                tracing::debug!("sync dial peer={peer} address={address} failed: {reason}");
                link.status.failure(&peer, &reason);
            }
        }
        let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
        let kick = link.redial.get(&peer).cloned().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => backoff = (backoff * 2).min(BACKOFF_MAX),
            // The peer reached us: it is back, dial it now.
            _ = kick.notified() => backoff = BACKOFF_MIN,
        }
    }
}

/// SNI for the dialled address: its host part when that is a name or an IP, else the hostname.
fn server_name(address: &str, hostname: &str) -> ServerName<'static> {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from(hostname.to_string()))
        .unwrap_or_else(|_| ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()))
}

/// One connection: `Ok` once a link was up and ended, `Err` when it never came up.
async fn dial_once(link: &Link, peer: &str, address: &str, name: ServerName<'static>) -> Result<(), String> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err("connect: timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, link.connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("tls: {e}")),
        Err(_) => return Err("tls: timed out".into()),
    };
    let binding = SYNC.binding(tls.get_ref().1).ok_or("tls: no exporter")?;
    let auth =
        Frame::Auth { node: link.node.clone(), mac: SYNC.client_tag(&link.secret, &link.node, &binding).to_vec() };
    frame::write(&mut tls, &auth).await.map_err(|e| format!("auth: {e}"))?;
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut tls, MAX_AUTH_FRAME)).await;
    match answer {
        Ok(Ok(Frame::AuthOk { mac })) if SYNC.check_server(&link.secret, &link.node, &binding, &mac) => {}
        Ok(Ok(_)) => {
            tracing::error!(
                "sync peer={peer} address={address} answered with a wrong proof: not a node of this cluster \
                 (another cluster secret?)"
            );
            return Err("the peer's proof is wrong".into());
        }
        Ok(Err(e)) => return Err(format!("refused (wrong cluster secret, or this node is not in its peers?): {e}")),
        Err(_) => return Err("auth: timed out".into()),
    }
    // A link that never got past HELLO (a config mismatch) is a failure: the backoff grows
    // instead of redialling ten times a second.
    run_link(link, tls, peer, Direction::Out).await
}

/// The milliseconds part of a clock value in HLC form.
fn wall_hlc() -> u64 {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    ms << 16
}

/// Marks the link down however the task ends (an error, a closed socket, shutdown).
struct Up<'a> {
    link: &'a Link,
    peer: &'a str,
    dir: Direction,
    reason: String,
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        tracing::warn!("sync link down peer={} direction={} reason={}", self.peer, self.dir.as_str(), self.reason);
        self.link.status.link_down(self.peer, self.dir, &self.reason);
        self.link.replication.changed();
    }
}

/// HELLO both ways, then heartbeats until the peer goes silent or away. `Ok` once the link was
/// up (whatever ended it), `Err` with the reason when it never came up.
async fn run_link<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    link: &Link,
    stream: S,
    peer: &str,
    dir: Direction,
) -> Result<(), String> {
    let (mut reader, writer) = tokio::io::split(stream);
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let hello = Frame::Hello { proto: PROTO, node: link.node.clone(), config_fp: link.fingerprint, hlc: wall_hlc() };
    if send(&writer, &hello).await.is_err() {
        return Err("closed before HELLO".into());
    }
    let theirs = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut reader, MAX_FRAME)).await {
        Ok(Ok(Frame::Hello { proto, node, config_fp, hlc })) if proto == PROTO && node == peer => (config_fp, hlc),
        Ok(Ok(Frame::Hello { proto, node, .. })) => {
            let reason = if proto != PROTO {
                format!("protocol version {proto}, this node speaks {PROTO}")
            } else {
                format!("it says it is node {}", shown(&node))
            };
            tracing::error!("sync peer={peer} direction={} refused: {reason}", dir.as_str());
            return Err(reason);
        }
        Ok(Ok(_)) => return Err("no HELLO".into()),
        Ok(Err(e)) => return Err(format!("before HELLO: {e}")),
        Err(_) => return Err("no HELLO in time".into()),
    };
    let (fingerprint, hlc) = theirs;
    if fingerprint != link.fingerprint {
        if link.status.mismatch(peer, &fingerprint) {
            tracing::error!(
                "sync peer={peer} config mismatch: this node's fingerprint {} differs from the peer's {}; users, \
                 domains, aliases and primaries must be the same in every node's config file; not syncing",
                super::hex(&link.fingerprint[..8]),
                super::hex(&fingerprint[..8])
            );
        }
        return Err("config mismatch".into());
    }
    let skew_ms = (hlc >> 16).abs_diff(wall_hlc() >> 16);
    if skew_ms > SKEW_WARNING.as_millis() as u64 {
        tracing::warn!("sync peer={peer} clock skew of {}s: check NTP on both nodes", skew_ms / 1000);
    }
    link.status.link_up(peer, dir, &fingerprint);
    if dir == Direction::In {
        // Only once the peer is known to be one we can sync with: a kick on every
        // authenticated connection would make two mismatched nodes redial each other at once.
        if let Some(kick) = link.redial.get(peer) {
            kick.notify_one();
        }
    }
    link.replication.changed();
    tracing::info!("sync link up peer={peer} direction={}", dir.as_str());
    let mut up = Up { link, peer, dir, reason: String::from("closed") };
    let pinger = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                if send(&writer, &Frame::Ping { hlc: wall_hlc() }).await.is_err() {
                    return;
                }
            }
        })
    };
    // Frames are read by their own task: a read cancelled halfway through a frame would lose it.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame, FrameError>>(4);
    let reader_task = tokio::spawn(async move {
        loop {
            let next = frame::read(&mut reader, MAX_FRAME).await;
            let end = next.is_err();
            if tx.send(next).await.is_err() || end {
                return;
            }
        }
    });
    // This node pushes its records on the connection it dialled and receives the peer's on the
    // one the peer dialled: the receiver says where to start.
    let mut engine = Some((engine::Link::default(), StoreReplica::new(link.store.clone())));
    if dir == Direction::In {
        let first = run_engine(&mut engine, |e, r| Ok(e.connected(r))).await;
        if let Err(reason) = send_all(&writer, first).await {
            up.reason = reason;
        }
    }
    let mut pump = tokio::time::interval(PUMP_INTERVAL);
    let every = link.anti_entropy_interval.max(Duration::from_secs(1));
    let mut anti_entropy = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // A delivery waiting for this peer's ack asks for its records to go now, not at the next tick.
    let mut kicks = link.replication.kicks();
    let mut heard = Instant::now();
    if up.reason == "closed" {
        up.reason = loop {
            tokio::select! {
                next = rx.recv() => {
                    let frame = match next {
                        None => break "closed".into(),
                        Some(Err(e)) => break e.to_string(),
                        Some(Ok(f)) => f,
                    };
                    heard = Instant::now();
                    link.status.contact(peer);
                    match frame {
                        Frame::Ping { hlc } => {
                            if send(&writer, &Frame::Pong { hlc }).await.is_err() {
                                break "write failed".into();
                            }
                        }
                        Frame::Pong { .. } => {}
                        Frame::Sync(msg) => {
                            if let Err(reason) = on_sync(link, peer, &mut engine, &writer, msg).await {
                                break reason;
                            }
                        }
                        Frame::Auth { .. } | Frame::AuthOk { .. } | Frame::Hello { .. } => break "unexpected frame".into(),
                    }
                }
                kicked = kicks.changed(), if dir == Direction::Out => {
                    if kicked.is_err() {
                        break "replication handle gone".into();
                    }
                    let batches = run_engine(&mut engine, |e, r| Ok(e.pump(r))).await;
                    if let Err(reason) = send_all(&writer, batches).await {
                        break reason;
                    }
                }
                _ = anti_entropy.tick(), if dir == Direction::Out => {
                    let digests = run_engine(&mut engine, |e, r| {
                        e.audit_all(r);
                        Ok(e.pump(r))
                    })
                    .await;
                    if let Err(reason) = send_all(&writer, digests).await {
                        break reason;
                    }
                }
                _ = pump.tick() => {
                    if heard.elapsed() > SILENCE_LIMIT {
                        break format!("silent for {}s", SILENCE_LIMIT.as_secs());
                    }
                    if dir == Direction::Out {
                        let batches = run_engine(&mut engine, |e, r| {
                            if let Err(err) = r.store().make_durable() {
                                tracing::warn!("sync flush before push failed error={err}");
                            }
                            Ok(e.pump(r))
                        })
                        .await;
                        if let Err(reason) = send_all(&writer, batches).await {
                            break reason;
                        }
                    }
                }
            }
        };
    }
    pinger.abort();
    reader_task.abort();
    Ok(())
}

/// Runs one engine step on the blocking pool (the replica blocks on sled), giving the state
/// back afterwards. `None` state means an earlier step panicked: the link is closed.
async fn run_engine<T: Send + 'static>(
    state: &mut Option<(engine::Link, StoreReplica)>,
    step: impl FnOnce(&mut engine::Link, &mut StoreReplica) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let Some(mut s) = state.take() else { return Err("replication step failed earlier".into()) };
    let (s, out) = tokio::task::spawn_blocking(move || {
        let out = step(&mut s.0, &mut s.1);
        (s, out)
    })
    .await
    .map_err(|e| format!("replication step failed: {e}"))?;
    *state = Some(s);
    out
}

async fn send_all<W: AsyncWrite + Unpin>(
    writer: &tokio::sync::Mutex<WriteHalf<W>>,
    msgs: Result<Vec<Msg>, String>,
) -> Result<(), String> {
    for msg in msgs? {
        send(writer, &Frame::Sync(msg)).await.map_err(|e| format!("write failed: {e}"))?;
    }
    Ok(())
}

/// One replication message: the engine's answer goes back on the same connection; acks carry
/// the peer's report, and the allocator numbers what is waiting once it has learnt something.
async fn on_sync<W: AsyncWrite + Unpin>(
    link: &Link,
    peer: &str,
    engine: &mut Option<(engine::Link, StoreReplica)>,
    writer: &tokio::sync::Mutex<WriteHalf<W>>,
    msg: Msg,
) -> Result<(), String> {
    let account = match &msg {
        Msg::Batch { account, .. } | Msg::Ack { account, .. } => Some(account.clone()),
        _ => None,
    };
    let is_ack = matches!(msg, Msg::Ack { .. });
    let is_audit = matches!(msg, Msg::Audited { .. });
    let is_vectors = matches!(msg, Msg::Vectors { .. });
    // The peer's vectors as it states them (on connect) or acks them: what it holds on disk.
    let stated: Vec<String> = match &msg {
        Msg::Vectors { accounts } => accounts.iter().map(|(a, _)| a.clone()).collect(),
        Msg::Ack { account, .. } => vec![account.clone()],
        _ => Vec::new(),
    };
    let replies =
        run_engine(engine, move |e, r| e.handle(msg, r).map_err(|err| format!("protocol error: {}", err.0))).await;
    if let Err(reason) = &replies {
        tracing::warn!("sync peer={peer} {reason}");
    }
    // Accounts this step applied a batch to (it acks them): a batch may be applied on a later
    // message than its own (after its bodies arrive), so this is read from the replies.
    let applied: BTreeSet<String> = match &replies {
        Ok(msgs) => msgs
            .iter()
            .filter_map(|m| if let Msg::Ack { account, .. } = m { Some(account.clone()) } else { None })
            .collect(),
        Err(_) => BTreeSet::new(),
    };
    if let Some((e, _)) = engine.as_ref() {
        if is_audit {
            link.status.audited(peer, e.audits());
        }
        if is_vectors {
            link.replication.known(peer);
        }
        for a in &stated {
            if let Some(v) = e.acked(a) {
                link.replication.publish(peer, a, v);
            }
        }
    }
    send_all(writer, replies).await?;
    // Which accounts the allocator looks at: those this node just applied records to (they may
    // have made messages unsafe here), and the acked one when the peer reports held messages.
    let mut check = applied;
    if let Some(account) = account.filter(|_| is_ack) {
        let holds = engine.as_ref().and_then(|(e, _)| e.peer_reports(&account).cloned());
        if let Some(r) = holds {
            let waiting = r.values().any(|x| !x.held.is_empty());
            link.reports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(peer.to_string())
                .or_default()
                .insert(account.clone(), r);
            if waiting {
                check.insert(account);
            }
        }
    }
    if check.is_empty() || !link.status.is_allocator() {
        return Ok(());
    }
    for account in check {
        let peer_reports: Vec<BTreeMap<Guid, Report>> = {
            let all = link.reports.lock().unwrap_or_else(|e| e.into_inner());
            all.values().filter_map(|accounts| accounts.get(&account).cloned()).collect()
        };
        run_engine(engine, move |_, r| {
            let own = r.reports(&account);
            let waiting = |reports: &BTreeMap<Guid, Report>| reports.values().any(|x| !x.held.is_empty());
            if waiting(&own) || peer_reports.iter().any(waiting) {
                let refs: Vec<&BTreeMap<Guid, Report>> = peer_reports.iter().collect();
                if r.allocate(&account, &refs) {
                    tracing::info!("sync account={account} UIDs assigned to held messages");
                }
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

async fn send<W: AsyncWrite + Unpin>(writer: &tokio::sync::Mutex<WriteHalf<W>>, frame: &Frame) -> std::io::Result<()> {
    let mut w = writer.lock().await;
    match tokio::time::timeout(SILENCE_LIMIT, frame::write(&mut *w, frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_for_dialled_addresses() {
        assert!(matches!(server_name("127.0.0.1:7890", "a.example"), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:7890", "a.example"), ServerName::IpAddress(_)));
        assert_eq!(server_name("b.example.org:7890", "a.example"), ServerName::try_from("b.example.org").unwrap());
    }

    #[test]
    fn tls_configs_build() {
        client_config().unwrap();
    }
}
