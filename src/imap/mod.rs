//! IMAP: the read path of RFC 3501 (IMAP4rev1) over the store. `parse` tokenises commands,
//! `session` runs the state machine, `fetch` renders FETCH data, `mime` renders the MIME-derived
//! items (ENVELOPE, BODYSTRUCTURE, BODY[section]).

mod append;
mod condstore;
mod copy;
mod fastfetch;
mod fetch;
mod idle;
mod mailboxes;
pub mod mime;
mod misc;
mod names;
pub mod parse;
mod quota;
mod search;
mod session;
mod sort;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Node};
use crate::net::{accept_tls, Conn, ConnLimiter, Stream};
use crate::store::Store;

/// What every IMAP session of a node shares.
pub struct ImapContext {
    pub hostname: String,
    pub store: Arc<Store>,
    pub tls: TlsAcceptor,
    /// Password hashes by lowercase address.
    pub users: BTreeMap<String, String>,
    pub idle_timeout: Duration,
    pub limiter: ConnLimiter,
    /// Largest message APPEND accepts (APPENDLIMIT, RFC 7889): `[smtp] max_message_size`.
    pub append_limit: u64,
    /// Storage limits by lowercase address (`[users."…"] quota`); absent: unlimited.
    pub quotas: BTreeMap<String, u64>,
    /// Failed logins per client address and per user, shared with SMTP submission.
    pub auth_limiter: Arc<crate::auth::AuthLimiter>,
    /// `[imap] plaintext_on_loopback`: logins without TLS from loopback addresses.
    pub plaintext_on_loopback: bool,
    /// With `[sync]`: APPEND waits for a peer's durable ack before its tagged OK.
    pub replication: Option<Arc<crate::sync::durable::Replication>>,
}

impl ImapContext {
    pub fn new(
        config: &Config,
        node: &Node,
        store: Arc<Store>,
        tls: TlsAcceptor,
        auth_limiter: Arc<crate::auth::AuthLimiter>,
    ) -> Self {
        // Replication: modseqs shown by this node carry its tag (RFC 7162 on failover, condstore.rs).
        // Kept after `[sync]` is removed, so shown values never shrink (`Store::adopt_modseq_tag`).
        let tag = condstore::node_tag(config, node);
        if let Err(e) = store.adopt_modseq_tag(tag) {
            tracing::error!("imap modseq tag: saving it failed error={e}");
            store.set_modseq_tag(tag);
        }
        ImapContext {
            hostname: node.hostname.clone(),
            store,
            tls,
            users: config.users.iter().map(|(a, u)| (a.clone(), u.password_hash.clone())).collect(),
            idle_timeout: config.imap.idle_timeout,
            limiter: ConnLimiter::new(config.imap.max_connections_per_ip, 10_000),
            append_limit: config.smtp.max_message_size,
            quotas: config.users.iter().filter_map(|(a, u)| Some((a.clone(), u.quota?))).collect(),
            auth_limiter,
            plaintext_on_loopback: config.imap.plaintext_on_loopback,
            replication: None,
        }
    }
}

pub async fn handle_connection(ctx: Arc<ImapContext>, tcp: TcpStream, peer: SocketAddr, implicit_tls: bool) {
    let sid = crate::smtp::session_id();
    tracing::info!("{sid} imap connected address={} tls={}", peer.ip(), if implicit_tls { "implicit" } else { "no" });
    let _ = tcp.set_nodelay(true);
    let Some(_guard) = ctx.limiter.acquire(peer.ip()) else {
        let mut conn = Conn::new(Stream::Plain(tcp));
        conn.write(b"* BYE Too many connections from your address\r\n");
        conn.shutdown().await;
        return;
    };
    let conn = if implicit_tls {
        match accept_tls(tcp, &ctx.tls, crate::net::TLS_HANDSHAKE_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!("{sid} imap tls failed error={e}");
                return;
            }
        }
    } else {
        Conn::new(Stream::Plain(tcp))
    };
    let reason = session::Session::new(ctx, sid.clone(), peer).run(conn).await;
    tracing::info!("{sid} imap disconnected reason={reason}");
}
