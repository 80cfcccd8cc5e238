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
use crate::delivery::LocalDelivery;
use crate::net::{Conn, ConnLimiter, Stream};
use crate::routing::Router;

pub use session::Session;

/// What every SMTP session of a node shares.
pub struct SmtpContext {
    pub hostname: String,
    pub settings: SmtpSettings,
    pub router: Arc<Router>,
    pub delivery: Arc<LocalDelivery>,
    pub tls: Option<TlsAcceptor>,
    pub limiter: ConnLimiter,
}

/// A short random session id, as OpenSMTPD prints one per session in its logs.
pub fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs one inbound connection to completion.
pub async fn handle_connection(ctx: Arc<SmtpContext>, tcp: TcpStream, peer: SocketAddr) {
    let sid = session_id();
    tracing::info!("{sid} smtp connected address={} host={}", peer.ip(), peer.ip());
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
