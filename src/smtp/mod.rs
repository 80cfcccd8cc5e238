//! SMTP: the inbound listener on port 25 (RFC 5321). `command`, `address` and `body` parse;
//! `session` holds the per-connection state machine.

pub mod address;
pub mod body;
pub mod command;
pub mod reply;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::SmtpSettings;
use crate::net::{Conn, ConnLimiter, Stream};
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

/// Runs one inbound connection to completion.
pub async fn handle_connection(ctx: Arc<SmtpContext>, tcp: TcpStream, peer: SocketAddr) {
    let sid = session_id();
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn::new(Stream::Plain(tcp));
    let Some(_guard) = ctx.limiter.acquire(peer.ip()) else {
        tracing::warn!("{sid} smtp refused address={} reason=too-many-connections", peer.ip());
        conn.write(b"421 4.7.0 Too many connections, try again later\r\n");
        conn.shutdown().await;
        return;
    };
    let session = Session::new(ctx, sid.clone(), peer);
    let reason = session.run(conn).await;
    tracing::info!("{sid} smtp disconnected reason={reason}");
}
