//! A running node: opens the store, builds TLS, binds every listener the node's config names
//! and hands each connection to its protocol. It prints one `listening PROTO ADDR` line per
//! socket (with the real port when the config says port 0), which tests and operators read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Node};
use crate::imap::ImapContext;
use crate::net::ConnLimiter;
use crate::routing::Router;
use crate::smtp::SmtpContext;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Submission,
    Submissions,
    Imap,
    Imaps,
    Http,
    Https,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Submission => "submission",
            Protocol::Submissions => "submissions",
            Protocol::Imap => "imap",
            Protocol::Imaps => "imaps",
            Protocol::Http => "http",
            Protocol::Https => "https",
        }
    }
}

/// The store directory inside a node's data directory.
pub fn store_dir(node: &Node) -> PathBuf {
    node.data_dir.join("store")
}

/// The certificate a node starts with: its stored ACME certificate, else its `[tls]` files,
/// else a self-signed one (so that mail still flows with opportunistic TLS), saying which.
fn initial_certificate(config: &Config, node: &Node) -> Result<Arc<rustls::sign::CertifiedKey>> {
    if config.acme.is_some() {
        match crate::acme::stored_certificate(&node.data_dir) {
            Ok(Some(key)) => return Ok(key),
            Ok(None) => tracing::warn!("acme no certificate yet: serving a self-signed one until the CA issues one"),
            Err(e) => tracing::warn!(
                "acme stored certificate unusable error={e:#}: serving a self-signed one until a new one is issued"
            ),
        }
    } else if let Some(files) = config.tls_for(node) {
        return crate::tls::certified_key_from_files(&files.cert, &files.key);
    } else {
        tracing::warn!("tls no [tls] or [acme] configured: serving a self-signed certificate");
    }
    let names = vec![node.hostname.clone()];
    let (cert, key) = crate::tls::ensure_self_signed(&node.data_dir.join("tls"), &names)?;
    crate::tls::certified_key_from_files(&cert, &key)
}

/// glibc's malloc keeps freed memory in per-thread arenas and raises its mmap threshold after
/// large frees, so a burst of sessions (argon2's 19 MiB per login, 64 KiB body buffers on
/// many threads) leaves hundreds of MiB resident for good. A fixed threshold sends large
/// blocks to mmap, returned on free, and fewer arenas bound the fragmentation.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters and takes the allocator lock itself.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Runs the node until SIGINT or SIGTERM.
pub async fn run(config: Config, node: Node) -> Result<()> {
    tune_allocator();
    std::fs::create_dir_all(&node.data_dir)
        .with_context(|| format!("creating data directory {}", node.data_dir.display()))?;
    let store = Arc::new(
        Store::open(&store_dir(&node), &node.name, config.store.cache_size)
            .with_context(|| format!("opening the store in {}", store_dir(&node).display()))?,
    );
    let certs = crate::tls::CertStore::new(initial_certificate(&config, &node)?);
    let tls = TlsAcceptor::from(crate::tls::server_config(certs.clone(), Vec::new())?);
    let challenges = crate::acme::Challenges::new(certs.clone());
    if let Some(acme) = &config.acme {
        let manager = crate::acme::Manager::new(acme.clone(), &node, challenges.clone());
        tokio::spawn(manager.run());
    }
    let srs = crate::routing::srs::Srs::from_config(&config).context("loading the SRS secrets")?.map(Arc::new);
    let router = Arc::new(Router::new(&config).with_srs(srs.clone()));
    let resolver = crate::dns::Resolver::new(&config.dns.nameservers, config.dns.timeout)
        .context("setting up the DNS resolver")?;
    // One count of failed logins for submission and IMAP: a guesser gains nothing by switching.
    let auth_limiter = Arc::new(crate::auth::AuthLimiter::new(
        config.submission.auth_failures_per_ip,
        config.submission.auth_failures_per_user,
        config.submission.auth_failure_window,
    ));
    // Replication (`[sync]`): shared by the links, the queue and IMAP (durable delivery waits
    // for a peer's ack) and the status readers. `None` keeps every path as without replication.
    let replication = crate::sync::durable::Replication::new(&config, &node, store.clone());
    let mut imap = ImapContext::new(&config, &node, store.clone(), tls.clone(), auth_limiter.clone());
    imap.replication = replication.clone();
    let imap = Arc::new(imap);

    let mut listeners = Vec::new();
    let plan = [
        (Protocol::Smtp, &node.listen.smtp),
        (Protocol::Submission, &node.listen.submission),
        (Protocol::Submissions, &node.listen.submissions),
        (Protocol::Imap, &node.listen.imap),
        (Protocol::Imaps, &node.listen.imaps),
        (Protocol::Http, &node.listen.http),
        (Protocol::Https, &node.listen.https),
    ];
    // Bind everything first: a node that cannot open one of its sockets says so and starts none.
    for (proto, addrs) in plan {
        for addr in addrs {
            let l = crate::net::bind(*addr).with_context(|| format!("listening on {addr} ({})", proto.name()))?;
            listeners.push((proto, l));
        }
    }
    let sync_listeners = crate::sync::net::bind(&config, &node)?;
    let mut metrics = Vec::new();
    for addr in &node.listen.metrics {
        metrics.push(crate::net::bind(*addr).with_context(|| format!("listening on {addr} (metrics)"))?);
    }
    if listeners.is_empty() {
        tracing::warn!("node {} has no listen addresses: it serves nothing", node.name);
    }
    let own_smtp: Vec<SocketAddr> =
        listeners.iter().filter(|(p, _)| *p == Protocol::Smtp).filter_map(|(_, l)| l.local_addr().ok()).collect();
    let dkim = crate::dkim::Signer::from_config(&config).context("loading the DKIM keys")?.map(Arc::new);
    let verifier =
        crate::verdict::Verifier::from_config(&config, &resolver).context("setting up inbound checks")?.map(Arc::new);
    let queue = crate::queue::Queue::new(
        store.clone(),
        config.outbound_for(&node),
        node.hostname.clone(),
        router.clone(),
        resolver.clone(),
        dkim.clone(),
        crate::queue::ClusterView::from_config(&config, &node, own_smtp),
    )
    .context("setting up the outbound queue")?;
    if let Some(r) = &replication {
        queue.set_replication(r.clone());
    }
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The admin socket (`postern queue ...`): bound before "ready", so a failure stops the start.
    let control = crate::control::ControlSocket::bind(&crate::control::socket_path(&node))?;
    tracing::info!("control socket path={}", control.path().display());
    let mut sync_addrs = Vec::new();
    for l in &sync_listeners {
        sync_addrs.push(l.local_addr()?);
    }
    // Replication links (`[sync]`): accept loops and diallers start now; a peer that connects
    // before "ready" is served like one that connects after.
    crate::sync::net::start(&config, &node, sync_listeners, certs.clone(), auth_limiter.clone(), replication.clone())?;
    let sync = replication.clone();
    tokio::spawn(control.serve(queue.clone(), paused.clone(), sync.clone()));
    let smtp = Arc::new(SmtpContext {
        hostname: node.hostname.clone(),
        settings: config.smtp.clone(),
        router: router.clone(),
        queue: queue.clone(),
        tls: Some(tls.clone()),
        limiter: ConnLimiter::new(config.smtp.max_connections_per_ip, config.smtp.max_connections),
        resolver,
        submission: Arc::new(crate::smtp::submission::SubmissionContext::new(&config, &router, auth_limiter.clone())),
        dkim,
        verifier,
        srs,
        role: node.role,
        cluster: crate::smtp::ClusterPeers::from_config(&config, &node.name),
        authserv_ids: config.nodes.values().map(|n| n.hostname.clone()).collect(),
        paused: paused.clone(),
        quotas: config.users.iter().filter_map(|(a, u)| Some((a.clone(), u.quota?))).collect(),
    });
    for (proto, l) in &listeners {
        let local = l.local_addr()?;
        println!("listening {} {}", proto.name(), local);
        tracing::info!("listening proto={} address={local}", proto.name());
    }
    for local in sync_addrs {
        println!("listening sync {local}");
        tracing::info!("listening proto=sync address={local}");
    }
    for l in metrics {
        let local = l.local_addr()?;
        println!("listening metrics {local}");
        tracing::info!("listening proto=metrics address={local}");
        let (queue, paused, sync) = (queue.clone(), paused.clone(), sync.clone());
        tokio::spawn(crate::metrics::serve(l, move || {
            let mut s = crate::control::snapshot(&queue, &paused);
            if let Some(view) = sync.as_deref().map(crate::sync::durable::Replication::view) {
                s.sync_under_replicated = Some(view.under_replicated);
                s.sync_peers = crate::metrics::SyncPeer::from_view(&view);
            }
            s
        }));
    }
    // Signal handlers exist before anyone is told the node is ready: a SIGTERM right after
    // "ready" still gets the final flush.
    let shutdown = shutdown_signal()?;
    println!("postern ready node={} role={}", node.name, node.role.as_str());
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // Port 443 answers TLS-ALPN-01 validation (RFC 8737); nothing else is served there yet.
    let alpn = TlsAcceptor::from(crate::tls::server_config(certs.clone(), vec![crate::tls::ACME_TLS_ALPN.to_vec()])?);
    // Ports 80 and 443 only answer CA validation: a few connections per client are plenty.
    let web_limiter = ConnLimiter::new(16, 512);
    let mut tasks = tokio::task::JoinSet::new();
    for (proto, listener) in listeners {
        let (smtp, imap, challenges, alpn) = (smtp.clone(), imap.clone(), challenges.clone(), alpn.clone());
        let web_limiter = web_limiter.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed proto={} error={e}", proto.name());
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match proto {
                    Protocol::Smtp | Protocol::Submission | Protocol::Submissions => {
                        let mode = match proto {
                            Protocol::Submission => crate::smtp::Mode::Submission,
                            Protocol::Submissions => crate::smtp::Mode::Submissions,
                            _ => crate::smtp::Mode::Mx,
                        };
                        tokio::spawn(crate::smtp::handle_connection(smtp.clone(), tcp, peer, mode));
                    }
                    Protocol::Imap | Protocol::Imaps => {
                        tokio::spawn(crate::imap::handle_connection(imap.clone(), tcp, peer, proto == Protocol::Imaps));
                    }
                    Protocol::Http | Protocol::Https => {
                        let Some(guard) = web_limiter.acquire(peer.ip()) else { continue };
                        let (challenges, alpn) = (challenges.clone(), alpn.clone());
                        tokio::spawn(async move {
                            if proto == Protocol::Http {
                                crate::acme::http01::handle_connection(challenges, tcp, peer).await;
                            } else {
                                crate::acme::tls_alpn_connection(alpn, tcp, peer).await;
                            }
                            drop(guard);
                        });
                    }
                }
            }
        });
    }
    let scheduler = tokio::spawn(queue.clone().run());
    shutdown.await;
    scheduler.abort();
    tracing::info!("shutting down node={}", node.name);
    tasks.abort_all();
    store.sync().await.context("final flush of the store")?;
    Ok(())
}

/// Registers SIGTERM and SIGINT now; the returned future ends at the first of them.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Parses `listening PROTO ADDR` lines (for tests and tools that start a node).
pub fn parse_listening_line(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line.strip_prefix("listening ")?;
    let (proto, addr) = rest.split_once(' ')?;
    Some((proto.to_string(), addr.trim().parse().ok()?))
}
