//! SMTP: the inbound listener on port 25 (RFC 5321) and message submission on ports 587
//! (STARTTLS) and 465 (implicit TLS; RFC 6409, RFC 8314). `command`, `address`, `body` and `sasl`
//! parse; `submission` holds the sender policy; `session` the per-connection state machine.

pub mod address;
pub mod body;
mod checks;
pub mod command;
pub mod reply;
pub mod sasl;
mod session;
pub mod submission;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::SmtpSettings;
use crate::net::{accept_tls, Conn, ConnLimiter, Stream};
use crate::routing::Router;

pub use session::Session;

/// What every SMTP session of a node shares.
pub struct SmtpContext {
    pub hostname: String,
    pub settings: SmtpSettings,
    pub router: Arc<Router>,
    /// Local copies and queued remote recipients are committed through here.
    pub queue: Arc<crate::queue::Queue>,
    pub tls: Option<TlsAcceptor>,
    pub limiter: ConnLimiter,
    pub resolver: crate::dns::Resolver,
    /// Users, sender policy and limits for the submission ports (with the shared AUTH limiter).
    pub submission: Arc<submission::SubmissionContext>,
    /// DKIM keys for submitted mail (`None`: no `[[dkim]]`).
    pub dkim: Option<Arc<crate::dkim::Signer>>,
    /// SPF/DKIM/DMARC checks on port 25 (`None`: off).
    pub verifier: Option<Arc<crate::verdict::Verifier>>,
    /// Sender rewriting for forwards (`None`: no `[srs]`).
    pub srs: Option<Arc<crate::routing::srs::Srs>>,
    /// A backup MX queues every accepted recipient for the primaries instead of storing it.
    pub role: crate::config::Role,
    /// The other nodes, which may authenticate their relay hop (`None`: no cluster secret).
    pub cluster: Option<ClusterPeers>,
    /// Every node's host name: an `Authentication-Results` field claiming one of them, from
    /// anyone but an authenticated node, is forged (RFC 8601 §5).
    pub authserv_ids: Vec<String>,
    /// `postern pause smtp`: new sessions get 421 until `resume`.
    pub paused: Arc<std::sync::atomic::AtomicBool>,
    /// Storage limits by lowercase address (`[users."…"] quota`).
    pub quotas: std::collections::BTreeMap<String, u64>,
}

impl SmtpContext {
    /// The first local mailbox among `dest` that cannot take `adding` more bytes. A message that
    /// arrives while there is room is taken whole even if it ends over the limit (as Dovecot's
    /// quota grace), so a quota never splits a message; the next one is refused.
    pub fn over_quota<'a>(&self, dest: &'a [crate::routing::Destination], adding: u64) -> Option<&'a str> {
        if self.quotas.is_empty() {
            return None;
        }
        dest.iter().find_map(|d| {
            let crate::routing::Destination::Mailbox(user) = d else { return None };
            let limit = *self.quotas.get(user)?;
            // A store error does not refuse mail: the commit itself would report it.
            let used = self.queue.store().usage_of(user).ok()?;
            (used >= limit || (adding > 0 && used.saturating_add(adding) > limit)).then_some(user.as_str())
        })
    }
}

/// Who may use AUTH X-POSTERN-CLUSTER on port 25, and with what secret.
pub struct ClusterPeers {
    pub secret: crate::config::Secret,
    /// Node names other than this one.
    pub nodes: Vec<String>,
}

impl ClusterPeers {
    pub fn from_config(config: &crate::config::Config, own: &str) -> Option<ClusterPeers> {
        let secret = config.cluster.secret.clone()?;
        let nodes = config.nodes.keys().filter(|n| *n != own).cloned().collect();
        Some(ClusterPeers { secret, nodes })
    }
}

/// Which port a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Port 25: mail for the cluster's domains, no AUTH.
    Mx,
    /// Port 587: STARTTLS, then AUTH, then relaying for the authenticated user.
    Submission,
    /// Port 465: like 587 with TLS from the first byte (RFC 8314).
    Submissions,
}

impl Mode {
    pub fn is_submission(self) -> bool {
        self != Mode::Mx
    }

    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Mx => "smtp",
            Mode::Submission => "submission",
            Mode::Submissions => "submissions",
        }
    }
}

/// The client's name when its reverse DNS is forward-confirmed (the PTR name resolves back to the
/// address), as Postfix and OpenSMTPD report it; `None` otherwise. A bounded number of lookups.
pub async fn confirmed_reverse_name(resolver: &crate::dns::Resolver, ip: std::net::IpAddr) -> Option<String> {
    let names = resolver.ptr(ip).await.ok()?;
    for name in names.into_iter().take(4) {
        if resolver.addresses(&name).await.is_ok_and(|addrs| addrs.contains(&ip)) {
            return Some(name);
        }
    }
    None
}

/// A short random session id, as OpenSMTPD prints one per session in its logs.
pub fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs one connection to completion.
pub async fn handle_connection(ctx: Arc<SmtpContext>, tcp: TcpStream, peer: SocketAddr, mode: Mode) {
    let sid = session_id();
    let _ = tcp.set_nodelay(true);
    let _client = crate::metrics::ClientGuard::enter();
    if ctx.paused.load(std::sync::atomic::Ordering::Relaxed) {
        // RFC 5321 §3.8: a 421 greeting; senders try their next MX or come back later.
        let mut conn = Conn::new(Stream::Plain(tcp));
        tracing::info!("{sid} smtp refused address={} reason=paused", peer.ip());
        if mode != Mode::Submissions {
            let text = format!("421 4.3.2 {} Service paused by the administrator, try again later\r\n", ctx.hostname);
            conn.write(text.as_bytes());
        }
        conn.shutdown().await;
        return;
    }
    let Some(_guard) = ctx.limiter.acquire(peer.ip()) else {
        let mut conn = Conn::new(Stream::Plain(tcp));
        tracing::warn!("{sid} smtp refused address={} reason=too-many-connections", peer.ip());
        if mode != Mode::Submissions {
            conn.write(b"421 4.7.0 Too many connections, try again later\r\n");
        }
        conn.shutdown().await;
        return;
    };
    let conn = if mode == Mode::Submissions {
        let Some(acceptor) = ctx.tls.clone() else {
            tracing::warn!("{sid} smtp refused address={} reason=no-tls", peer.ip());
            return;
        };
        match accept_tls(tcp, &acceptor, crate::net::TLS_HANDSHAKE_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!("{sid} smtp tls failed address={} error={e}", peer.ip());
                return;
            }
        }
    } else {
        Conn::new(Stream::Plain(tcp))
    };
    let session = Session::new(ctx, sid.clone(), peer, mode);
    let reason = session.run(conn).await;
    tracing::info!("{sid} smtp disconnected reason={reason}");
}
