//! Queue throughput benchmark: N messages are submitted (port 587, STARTTLS, AUTH PLAIN) to a
//! sending node for a recipient outside its cluster, and the sender's outbound queue delivers them
//! by MX lookup (an in-process DNS server) to a second node over loopback.
//!
//! Phases, each with fresh nodes and data directories:
//! - `queued`: the receiver's SMTP port is reserved but nothing listens on it while the clients
//!   submit, so every message ends up deferred in the sender's queue. Then the receiver starts and
//!   the sender is made to retry (`postern queue flush` when the binary has it, else short retry
//!   times in `[outbound]`); the bench times until the receiver's INBOX holds all N.
//! - `live`: the receiver runs from the start; submission and delivery overlap.
//!
//! Run: `cargo bench --bench queue -- [-s CLIENTS] [-m MESSAGES] [-l SIZE] [--phase queued|live|all]
//! [--per-domain N] [--timeout SECS] [--settle SECS] [--dir PATH] [--keep] [--restart]
//! [--sender-extra TOML]`; every option also reads an environment variable (BENCH_CLIENTS,
//! BENCH_MESSAGES, BENCH_SIZE, BENCH_PHASE, BENCH_PER_DOMAIN, BENCH_TIMEOUT, BENCH_SETTLE,
//! BENCH_DIR, BENCH_KEEP, BENCH_RESTART, BENCH_SENDER_EXTRA). POSTERN_BIN picks the
//! server binary. Results go to stdout as `key=value` lines; progress goes to stderr as lines
//! starting with `#`. See docs/benchmarks.md.

mod common;
#[allow(dead_code)]
#[path = "../tests/common/dns.rs"]
mod dns;

use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

const SENDER_DOMAIN: &str = "example.test";
const SENDER_HOST: &str = "mx.example.test";
const SENDER_USER: &str = "alice@example.test";
const DEST_DOMAIN: &str = "dest.example";
const DEST_HOST: &str = "mx.dest.example";
const DEST_USER: &str = "carol@dest.example";
const ZONE: &str = "dest.example MX 10 mx.dest.example\nmx.dest.example A 127.0.0.1\n";
/// The text the payload's lines cycle through.
const PAYLOAD_TEXT: &[u8] = b"Postern queue benchmark payload: the quick brown fox jumps over the lazy dog 0123456789 ";
/// How often the receiver's mailbox is polled.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// The sender's default `[outbound] max_connections_per_domain`.
const DEFAULT_PER_DOMAIN: usize = 20;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Live,
}

struct Opts {
    clients: usize,
    messages: usize,
    size: usize,
    phases: Vec<Phase>,
    per_domain: Option<usize>,
    timeout: Duration,
    settle: Duration,
    dir: Option<PathBuf>,
    keep: bool,
    /// Restart the sender with everything queued before the receiver starts.
    restart: bool,
    /// TOML appended to the sender's cluster file (new tables, e.g. `[store] cache_size`).
    sender_extra: String,
}

const USAGE: &str = "usage: cargo bench --bench queue -- [-s|--clients N] [-m|--messages M] [-l|--size BYTES] \
[--phase queued|live|all] [--per-domain N] [--timeout SECS] [--settle SECS] [--dir PATH] [--keep] [--restart] [--sender-extra TOML]";

fn parse_phases(s: &str) -> Result<Vec<Phase>> {
    match s {
        "all" => Ok(vec![Phase::Queued, Phase::Live]),
        "queued" => Ok(vec![Phase::Queued]),
        "live" => Ok(vec![Phase::Live]),
        _ => bail!("--phase {s}: expected queued, live or all"),
    }
}

fn parse_opts() -> Result<Option<Opts>> {
    let per_domain: usize = env_or("BENCH_PER_DOMAIN", 0)?;
    let mut o = Opts {
        clients: env_or("BENCH_CLIENTS", 32)?,
        messages: env_or("BENCH_MESSAGES", 10_000)?,
        size: env_or("BENCH_SIZE", 10_240)?,
        phases: parse_phases(&env_or("BENCH_PHASE", "all".to_string())?)?,
        per_domain: (per_domain > 0).then_some(per_domain),
        timeout: Duration::from_secs(env_or("BENCH_TIMEOUT", 900)?),
        settle: Duration::from_secs_f64(env_or("BENCH_SETTLE", 2.0)?),
        dir: std::env::var_os("BENCH_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        keep: env_flag("BENCH_KEEP"),
        restart: env_flag("BENCH_RESTART"),
        sender_extra: env_or("BENCH_SENDER_EXTRA", String::new())?,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"));
        let num = |name: &str, v: String| v.parse::<usize>().map_err(|_| anyhow!("{name} {v}: not a number"));
        match a.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-s" | "--clients" => o.clients = num("--clients", value("--clients")?)?,
            "-m" | "--messages" => o.messages = num("--messages", value("--messages")?)?,
            "-l" | "--size" => o.size = num("--size", value("--size")?)?,
            "--phase" => o.phases = parse_phases(&value("--phase")?)?,
            "--per-domain" => o.per_domain = Some(num("--per-domain", value("--per-domain")?)?),
            "--timeout" => o.timeout = Duration::from_secs(num("--timeout", value("--timeout")?)? as u64),
            "--settle" => {
                let v = value("--settle")?;
                o.settle = Duration::from_secs_f64(v.parse().map_err(|_| anyhow!("--settle {v}: not a number"))?);
            }
            "--dir" => o.dir = Some(PathBuf::from(value("--dir")?)),
            "--keep" => o.keep = true,
            "--restart" => o.restart = true,
            "--sender-extra" => o.sender_extra = value("--sender-extra")?.replace("\\n", "\n"),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if o.clients == 0 || o.messages == 0 || o.per_domain == Some(0) {
        bail!("clients, messages and --per-domain must be at least 1");
    }
    if o.clients > 1000 {
        bail!("at most 1000 clients");
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// Host facts from /proc

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// A free loopback port: bound and released, so a node can listen on it later.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Samples a process's VmRSS every 100 ms and keeps the largest value (a fallback for VmHWM).
struct RssSampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(k) = proc_status_kib(pid, "VmRSS") {
                    p.fetch_max(k, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { peak, task }
    }

    /// The peak since the last call, starting afresh.
    fn take(&self) -> Option<u64> {
        Some(self.peak.swap(0, Ordering::Relaxed)).filter(|k| *k > 0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// TLS: trust exactly the self-signed certificate a node generated for its hostname

fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| anyhow!("{host}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The nodes

struct Node {
    child: Child,
    pid: u32,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    listening: Vec<(String, SocketAddr)>,
}

fn postern_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("POSTERN_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // Cargo builds the binary (same profile as --release) before it runs a bench.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_postern"));
    if !built.exists() {
        bail!("{} is missing: run cargo build --release --bin postern", built.display());
    }
    Ok(built)
}

/// Whether the binary has `postern queue flush` (clap exits 0 for the help of a known command).
async fn has_queue_flush(bin: &Path) -> bool {
    Command::new(bin)
        .args(["queue", "flush", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Settings of the sending node's queue that the bench chose.
struct SenderQueue {
    mx_port: u16,
    dns: SocketAddr,
    per_domain: usize,
    /// `retry_initial`/`retry_max`, or None for the defaults.
    retry: Option<(&'static str, &'static str)>,
}

fn sender_config(dir: &Path, hash: &str, q: &SenderQueue, o: &Opts) -> String {
    let per_ip = (o.clients + 16).max(200);
    let retry = match q.retry {
        Some((initial, max)) => format!("retry_initial = \"{initial}\"\nretry_max = \"{max}\"\n"),
        None => String::new(),
    };
    format!(
        r#"[cluster]
domains = ["{SENDER_DOMAIN}"]

[nodes.sender]
hostname = "{SENDER_HOST}"
data_dir = "{data}"
listen.smtp = ["127.0.0.1:0"]
listen.submission = ["127.0.0.1:0"]

[users."{SENDER_USER}"]
password = "{hash}"

[smtp]
max_connections_per_ip = {per_ip}
max_connections = {total}

[submission]
max_messages_per_hour = 100000000

[dns]
nameservers = ["{dns}"]
timeout = "2s"

[outbound]
mx_port = {mx_port}
max_connections_per_domain = {per_domain}
{retry}
{extra}
"#,
        data = dir.join("data").display(),
        total = per_ip.max(1000),
        dns = q.dns,
        mx_port = q.mx_port,
        per_domain = q.per_domain,
        extra = o.sender_extra,
    )
}

/// The receiver asks the bench's DNS too: its inbound checks (SPF/DMARC of the sender's domain)
/// must not depend on the machine's resolver.
fn receiver_config(dir: &Path, hash: &str, port: u16, dns: SocketAddr) -> String {
    format!(
        r#"[cluster]
domains = ["{DEST_DOMAIN}"]

[nodes.receiver]
hostname = "{DEST_HOST}"
data_dir = "{data}"
listen.smtp = ["127.0.0.1:{port}"]
listen.imaps = ["127.0.0.1:0"]

[users."{DEST_USER}"]
password = "{hash}"

[smtp]
max_connections_per_ip = 1000
max_connections = 2000

[dns]
nameservers = ["{dns}"]
timeout = "2s"
"#,
        data = dir.join("data").display(),
    )
}

async fn start_node(bin: &Path, dir: &Path, name: &str, config_text: &str) -> Result<Node> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("postern.toml");
    let log = dir.join("postern.log");
    std::fs::write(&config, config_text).with_context(|| format!("writing {}", config.display()))?;
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let (child, pid, listening) = spawn_serve(bin, &config, name, &log, stderr, &format!("node {name}")).await?;
    Ok(Node { child, pid, config, data_dir: dir.join("data"), log, listening })
}

impl Node {
    fn addr(&self, proto: &str) -> Result<SocketAddr> {
        self.listening
            .iter()
            .find(|(p, _)| p == proto)
            .map(|(_, a)| *a)
            .ok_or_else(|| anyhow!("the node printed no {proto} address"))
    }

    async fn stop(mut self) -> Result<()> {
        stop_child(&mut self.child, self.pid).await
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// WARN and ERROR lines of the node's log, less the expected self-signed certificate warning.
    fn log_problems(&self) -> Vec<String> {
        log_problems(&self.log_text())
    }
}

/// `postern queue ...` against a node; its stdout.
async fn queue_cli(bin: &Path, node: &Node, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(&node.config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running postern queue")?;
    if !out.status.success() {
        bail!(
            "postern queue {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `postern queue list` says: (entries, entries whose next try is `now` or `active`).
async fn queue_counts(bin: &Path, node: &Node) -> Result<(usize, usize)> {
    let text = queue_cli(bin, node, &["list"]).await?;
    let mut entries = 0;
    let mut pending = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 7 || f[0] == "ID" || !f[0].chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        entries += 1;
        if f[6] == "now" || f[6] == "active" {
            pending += 1;
        }
    }
    Ok((entries, pending))
}

/// Facts from the sender's log: `result=Ok` and `result=deferred` lines, with the timestamps of
/// the first and last `result=Ok`.
struct LogFacts {
    ok: usize,
    deferred: usize,
    first_ok: Option<chrono::DateTime<chrono::FixedOffset>>,
    last_ok: Option<chrono::DateTime<chrono::FixedOffset>>,
}

fn log_facts(text: &str) -> LogFacts {
    let mut f = LogFacts { ok: 0, deferred: 0, first_ok: None, last_ok: None };
    for l in text.lines() {
        // `queue id=` lines are outbound attempts; `delivery id=` lines are the submissions.
        if !l.contains(" queue id=") {
            continue;
        }
        if l.contains(" result=Ok") {
            f.ok += 1;
            let t = l.split_whitespace().next().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            if f.first_ok.is_none() {
                f.first_ok = t;
            }
            if t.is_some() {
                f.last_ok = t;
            }
        } else if l.contains(" result=deferred") {
            f.deferred += 1;
        }
    }
    f
}

// ---------------------------------------------------------------------------------------------
// IMAP: count carol's INBOX on the receiver

/// Polls the INBOX until it holds `target` messages; returns when that was seen, from `start`.
/// `last` follows the count; the deadline ends the wait with an error.
async fn wait_inbox(
    mut imap: Imap,
    target: u64,
    start: Instant,
    last: Arc<AtomicU64>,
    deadline: Instant,
) -> Result<Duration> {
    loop {
        let n = imap.inbox_count().await?;
        let at = start.elapsed();
        last.store(n, Ordering::Relaxed);
        if n >= target {
            let _ = imap.command("LOGOUT").await;
            return Ok(at);
        }
        if Instant::now() >= deadline {
            bail!("the receiver's INBOX holds {n} of {target} messages at the deadline");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Prints how far delivery got every 5 s while `f` runs.
async fn with_progress<T>(what: &str, last: Arc<AtomicU64>, target: u64, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let report = async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            eprintln!(
                "# {what}: {} of {target} delivered after {:.0} s",
                last.load(Ordering::Relaxed),
                start.elapsed().as_secs_f64()
            );
        }
    };
    tokio::select! {
        r = f => r,
        _ = report => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------------
// Submission load: clients on port 587, STARTTLS, AUTH PLAIN once, then many messages each

async fn submission_session(addr: SocketAddr, tls: TlsConnector) -> Result<BufReader<Box<dyn Io>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut io = BufReader::new(Box::new(tcp) as Box<dyn Io>);
    expect(&mut io, 220, "greeting").await?;
    io.get_mut().write_all(b"EHLO client.example.test\r\n").await?;
    let ehlo = expect(&mut io, 250, "EHLO").await?;
    if !ehlo.contains("STARTTLS") {
        bail!("the submission port does not offer STARTTLS");
    }
    io.get_mut().write_all(b"STARTTLS\r\n").await?;
    expect(&mut io, 220, "STARTTLS").await?;
    if !io.buffer().is_empty() {
        bail!("data after the STARTTLS reply");
    }
    let stream = tls.connect(server_name(SENDER_HOST)?, io.into_inner()).await.context("SMTP TLS handshake")?;
    let mut io = BufReader::new(Box::new(stream) as Box<dyn Io>);
    io.get_mut().write_all(b"EHLO client.example.test\r\n").await?;
    expect(&mut io, 250, "EHLO after STARTTLS").await?;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{SENDER_USER}\0{PASSWORD}"));
    io.get_mut().write_all(format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
    expect(&mut io, 235, "AUTH PLAIN").await?;
    Ok(io)
}

#[derive(Default)]
struct ClientStats {
    accepted: u64,
    rejected: u64,
    errors: Vec<String>,
}

async fn submit_client(
    addr: SocketAddr,
    tls: TlsConnector,
    next: Arc<AtomicUsize>,
    total: usize,
    body: Arc<Vec<u8>>,
    accepted: Arc<AtomicU64>,
    ready: Arc<tokio::sync::Barrier>,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let session = submission_session(addr, tls).await;
    // Every client authenticates before any sends, so the AUTH cost is measured apart.
    ready.wait().await;
    let mut io = match session {
        Ok(io) => io,
        Err(e) => {
            stats.errors.push(format!("session setup: {e:#}"));
            return stats;
        }
    };
    let envelope = format!("MAIL FROM:<{SENDER_USER}>\r\nRCPT TO:<{DEST_USER}>\r\nDATA\r\n");
    let result: Result<()> = async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= total {
                break;
            }
            // PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write.
            io.get_mut().write_all(envelope.as_bytes()).await?;
            let (_, mail_text) = read_reply(&mut io).await?;
            let (_, rcpt_text) = read_reply(&mut io).await?;
            let (data, data_text) = read_reply(&mut io).await?;
            if data != 354 {
                stats.rejected += 1;
                if stats.errors.len() < 5 {
                    stats.errors.push(format!("message {i}: {mail_text} / {rcpt_text} / {data_text}"));
                }
                if data_text.starts_with("421") {
                    bail!("server closing: {data_text}");
                }
                continue;
            }
            let headers = format!(
                "From: <{SENDER_USER}>\r\nTo: <{DEST_USER}>\r\nSubject: queue bench {i}\r\n\
                 Message-ID: <qbench.{i}@example.test>\r\nDate: Sat, 21 Nov 2026 00:00:00 +0000\r\n\r\n"
            );
            io.get_mut().write_all(headers.as_bytes()).await?;
            io.get_mut().write_all(&body).await?;
            io.get_mut().write_all(b".\r\n").await?;
            let (code, text) = read_reply(&mut io).await?;
            if code == 250 {
                stats.accepted += 1;
                accepted.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.rejected += 1;
                if stats.errors.len() < 5 {
                    stats.errors.push(format!("message {i}: {text}"));
                }
                if code == 421 {
                    bail!("server closing: {text}");
                }
            }
        }
        io.get_mut().write_all(b"QUIT\r\n").await?;
        let _ = read_reply(&mut io).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        stats.errors.push(format!("{e:#}"));
    }
    stats
}

struct LoadResult {
    /// From the first connection until every client has authenticated.
    auth: Duration,
    /// Sender VmHWM at that point (argon2 verifications run in parallel), before it is reset.
    auth_peak_kib: Option<u64>,
    /// From then until the last reply.
    elapsed: Duration,
    accepted: u64,
    rejected: u64,
    errors: Vec<String>,
}

/// Submits the load; `on_ready` runs once every client has authenticated, when the timing starts.
async fn submit_load(sender: &Node, o: &Opts, accepted: Arc<AtomicU64>, on_ready: impl FnOnce()) -> Result<LoadResult> {
    let addr = sender.addr("submission")?;
    let tls = tls_connector(&sender.data_dir)?;
    let body = Arc::new(payload(o.size, PAYLOAD_TEXT));
    let next = Arc::new(AtomicUsize::new(0));
    let n = o.clients.min(o.messages);
    let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = submit_client(
                addr,
                tls.clone(),
                next.clone(),
                o.messages,
                body.clone(),
                accepted.clone(),
                ready.clone(),
            );
            tokio::spawn(client)
        })
        .collect();
    ready.wait().await;
    let auth = t0.elapsed();
    let auth_peak_kib = proc_status_kib(sender.pid, "VmHWM");
    on_ready();
    let start = Instant::now();
    let mut r =
        LoadResult { auth, auth_peak_kib, elapsed: Duration::ZERO, accepted: 0, rejected: 0, errors: Vec::new() };
    for t in tasks {
        let s = t.await.context("client task")?;
        r.accepted += s.accepted;
        r.rejected += s.rejected;
        r.errors.extend(s.errors);
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Ctx<'a> {
    bin: &'a Path,
    hash: &'a str,
    base: &'a Path,
    dns: SocketAddr,
    flush: bool,
    deadline: Instant,
}

fn push_load(out: &mut Vec<String>, p: &str, load: &LoadResult) {
    out.push(format!("{p}accepted={}", load.accepted));
    out.push(format!("{p}rejected={}", load.rejected));
    out.push(format!("{p}client_errors={}", load.errors.len()));
    out.push(format!("{p}auth_s={}", secs(load.auth)));
    out.push(format!("{p}auth_peak_rss_mib={}", mib(load.auth_peak_kib)));
    out.push(format!("{p}accept_s={}", secs(load.elapsed)));
    out.push(format!("{p}accepted_msgs_per_s={}", rate(load.accepted, load.elapsed)));
    for e in load.errors.iter().take(10) {
        eprintln!("# client error: {e}");
    }
}

fn push_log_facts(out: &mut Vec<String>, p: &str, sender: &Node) {
    let f = log_facts(&sender.log_text());
    out.push(format!("{p}sender_log_ok_lines={}", f.ok));
    out.push(format!("{p}sender_log_deferred_lines={}", f.deferred));
    if let (Some(a), Some(b)) = (f.first_ok, f.last_ok) {
        let span = (b - a).to_std().unwrap_or_default();
        out.push(format!("{p}sender_log_first_to_last_ok_s={}", secs(span)));
        out.push(format!("{p}sender_log_ok_per_s={}", rate(f.ok.saturating_sub(1) as u64, span)));
    }
}

fn push_problems(out: &mut Vec<String>, p: &str, who: &str, node: &Node) {
    let problems = node.log_problems();
    out.push(format!("{p}{who}_log_problems={}", problems.len()));
    for l in problems.iter().take(5) {
        eprintln!("# {who} log: {l}");
    }
}

async fn phase_queued(cx: &Ctx<'_>, o: &Opts, out: &mut Vec<String>) -> Result<()> {
    let dir = cx.base.join("queued");
    let port = free_port()?;
    let q = SenderQueue {
        mx_port: port,
        dns: cx.dns,
        per_domain: o.per_domain.unwrap_or(DEFAULT_PER_DOMAIN),
        // Without `queue flush`, deferred entries must come due again quickly by themselves.
        retry: if cx.flush { None } else { Some(("1s", "2s")) },
    };
    out.push(format!("retry_mode={}", if cx.flush { "queue-flush" } else { "retry_initial=1s,retry_max=2s" }));
    eprintln!("# queued: receiver port {port} reserved (nothing listens yet); starting the sender");
    let sender_text = sender_config(&dir.join("sender"), cx.hash, &q, o);
    let sender = start_node(cx.bin, &dir.join("sender"), "sender", &sender_text).await?;
    let spid = sender.pid;
    tokio::time::sleep(o.settle).await;
    out.push(format!("sender_idle_rss_mib={}", mib(proc_status_kib(spid, "VmRSS"))));
    let sampler = RssSampler::start(spid);

    eprintln!("# queued: submitting {} messages of {} bytes over {} clients", o.messages, o.size, o.clients);
    let cpu0 = proc_cpu(spid);
    let mut accept_reset = false;
    let load = tokio::time::timeout(
        cx.deadline.saturating_duration_since(Instant::now()),
        submit_load(&sender, o, Arc::new(AtomicU64::new(0)), || {
            accept_reset = reset_peak_rss(spid);
            sampler.take();
        }),
    )
    .await
    .map_err(|_| anyhow!("submission did not finish before the bench's timeout"))??;
    let cpu1 = proc_cpu(spid);
    push_load(out, "", &load);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        out.push(format!("accept_sender_cpu_s={:.2}", b.saturating_sub(a).as_secs_f64()));
    }
    // VmHWM since every client had authenticated (the AUTH peak is reported apart).
    let accept_peak = if accept_reset { proc_status_kib(spid, "VmHWM") } else { sampler.take() };
    out.push(format!("accept_peak_rss_mib={}", mib(accept_peak)));
    eprintln!(
        "# queued: {} accepted in {:.1} s; waiting for the first attempts",
        load.accepted,
        load.elapsed.as_secs_f64()
    );

    // Every entry has had its first (refused) attempt once nothing is `now` or `active`.
    let first = Instant::now();
    let mut counts = (0, 0);
    while Instant::now() < cx.deadline {
        counts = queue_counts(cx.bin, &sender).await?;
        if counts.1 == 0 && counts.0 as u64 >= load.accepted {
            break;
        }
        if first.elapsed() > Duration::from_secs(120) {
            eprintln!("# queued: still {} of {} entries pending after 120 s; going on", counts.1, counts.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out.push(format!("queue_entries_before_receiver={}", counts.0));
    out.push(format!("queue_pending_before_receiver={}", counts.1));
    out.push(format!("first_attempts_done_after_accept_s={}", secs(first.elapsed())));
    tokio::time::sleep(o.settle).await;
    let queued_rss = proc_status_kib(spid, "VmRSS");
    out.push(format!("queued_rss_mib={}", mib(queued_rss)));
    out.push(format!("queued_rss_anon_mib={}", mib(proc_status_kib(spid, "RssAnon"))));
    out.push(format!("queued_threads={}", proc_status_kib(spid, "Threads").unwrap_or(0)));
    let pre = log_facts(&sender.log_text());
    out.push(format!("sender_log_deferred_before_receiver={}", pre.deferred));
    eprintln!("# queued: {} entries in the queue, sender RSS {} MiB; starting the receiver", counts.0, mib(queued_rss));

    // Delivery.
    // With --restart, the sender restarts with everything queued: the RSS it needs to hold the
    // queue, apart from what accepting it left behind.
    let (sender, spid, sampler) = if o.restart {
        drop(sampler);
        sender.stop().await.context("stopping the sender before its restart")?;
        let t = Instant::now();
        let sender = start_node(cx.bin, &dir.join("sender"), "sender", &sender_text).await?;
        out.push(format!("restart_ready_s={}", secs(t.elapsed())));
        let spid = sender.pid;
        tokio::time::sleep(o.settle).await;
        out.push(format!("restart_rss_mib={}", mib(proc_status_kib(spid, "VmRSS"))));
        out.push(format!("restart_rss_anon_mib={}", mib(proc_status_kib(spid, "RssAnon"))));
        out.push(format!("restart_peak_rss_mib={}", mib(proc_status_kib(spid, "VmHWM"))));
        let sampler = RssSampler::start(spid);
        (sender, spid, sampler)
    } else {
        (sender, spid, sampler)
    };
    let hwm_reset = reset_peak_rss(spid);
    sampler.take();
    let cpu2 = proc_cpu(spid);
    let start = Instant::now();
    let receiver = start_node(
        cx.bin,
        &dir.join("receiver"),
        "receiver",
        &receiver_config(&dir.join("receiver"), cx.hash, port, cx.dns),
    )
    .await?;
    let rpid = receiver.pid;
    let rcpu0 = proc_cpu(rpid);
    out.push(format!("receiver_start_s={}", secs(start.elapsed())));
    if cx.flush {
        let t = Instant::now();
        queue_cli(cx.bin, &sender, &["flush"]).await?;
        out.push(format!("flush_command_s={}", secs(t.elapsed())));
    }
    let rtls = tls_connector(&receiver.data_dir)?;
    let imap = Imap::connect(receiver.addr("imaps")?, &rtls, server_name(DEST_HOST)?, DEST_USER)
        .await
        .context("IMAP login on the receiver")?;
    let last = Arc::new(AtomicU64::new(0));
    let waited = with_progress(
        "queued",
        last.clone(),
        load.accepted,
        wait_inbox(imap, load.accepted, start, last.clone(), cx.deadline),
    )
    .await;
    let cpu3 = proc_cpu(spid);
    let rcpu1 = proc_cpu(rpid);
    let deliver_peak = if hwm_reset { proc_status_kib(spid, "VmHWM") } else { sampler.take() };
    drop(sampler);
    let delivered = match &waited {
        Ok(at) => {
            out.push(format!("delivered={}", load.accepted));
            out.push(format!("deliver_s={}", secs(*at)));
            out.push(format!("delivered_msgs_per_s={}", rate(load.accepted, *at)));
            true
        }
        Err(e) => {
            eprintln!("# queued: delivery incomplete: {e:#}");
            out.push(format!("delivered={}", last.load(Ordering::Relaxed)));
            out.push("delivered_msgs_per_s=n/a".into());
            false
        }
    };
    out.push(format!("deliver_peak_rss_mib={}", mib(deliver_peak)));
    out.push(format!("deliver_peak_rss_source={}", if hwm_reset { "VmHWM" } else { "sampled-VmRSS" }));
    let overall = [load.auth_peak_kib, accept_peak, deliver_peak].into_iter().flatten().max();
    out.push(format!("sender_peak_rss_mib={}", mib(overall)));
    out.push(format!("sender_end_rss_mib={}", mib(proc_status_kib(spid, "VmRSS"))));
    out.push(format!("receiver_peak_rss_mib={}", mib(proc_status_kib(rpid, "VmHWM"))));
    if let (Some(a), Some(b)) = (cpu2, cpu3) {
        let c = b.saturating_sub(a).as_secs_f64();
        out.push(format!("deliver_sender_cpu_s={c:.2}"));
        out.push(format!("deliver_sender_cpu_ms_per_msg={:.3}", c * 1000.0 / load.accepted.max(1) as f64));
    }
    if let (Some(a), Some(b)) = (rcpu0, rcpu1) {
        out.push(format!("deliver_receiver_cpu_s={:.2}", b.saturating_sub(a).as_secs_f64()));
    }
    push_log_facts(out, "", &sender);
    let rlog = receiver.log_text();
    out.push(format!("receiver_smtp_connections={}", rlog.matches("smtp connected").count()));
    if delivered {
        // The last entries are removed just after their delivery is logged: give them a moment.
        let mut left = queue_counts(cx.bin, &sender).await;
        for _ in 0..20 {
            if !matches!(left, Ok((n, _)) if n > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            left = queue_counts(cx.bin, &sender).await;
        }
        out.push(format!("queue_entries_after={}", left.map(|c| c.0.to_string()).unwrap_or_else(|e| format!("{e:#}"))));
    }
    out.push(format!("sender_store_bytes={}", dir_bytes(&sender.data_dir)));
    push_problems(out, "", "sender", &sender);
    push_problems(out, "", "receiver", &receiver);
    let s = sender.stop().await;
    let r = receiver.stop().await;
    out.push(format!("clean_shutdown={}", s.is_ok() && r.is_ok()));
    waited.map(|_| ())
}

async fn phase_live(cx: &Ctx<'_>, o: &Opts, out: &mut Vec<String>) -> Result<()> {
    let dir = cx.base.join("live");
    let port = free_port()?;
    eprintln!("# live: starting the receiver on port {port}, then the sender");
    let receiver = start_node(
        cx.bin,
        &dir.join("receiver"),
        "receiver",
        &receiver_config(&dir.join("receiver"), cx.hash, port, cx.dns),
    )
    .await?;
    let q = SenderQueue {
        mx_port: port,
        dns: cx.dns,
        per_domain: o.per_domain.unwrap_or(DEFAULT_PER_DOMAIN),
        retry: if cx.flush { None } else { Some(("1s", "2s")) },
    };
    let sender =
        start_node(cx.bin, &dir.join("sender"), "sender", &sender_config(&dir.join("sender"), cx.hash, &q, o)).await?;
    let (spid, rpid) = (sender.pid, receiver.pid);
    tokio::time::sleep(o.settle).await;
    let rtls = tls_connector(&receiver.data_dir)?;
    let imap = Imap::connect(receiver.addr("imaps")?, &rtls, server_name(DEST_HOST)?, DEST_USER)
        .await
        .context("IMAP login on the receiver")?;
    let last = Arc::new(AtomicU64::new(0));
    let cpu0 = proc_cpu(spid);
    let rcpu0 = proc_cpu(rpid);
    eprintln!("# live: submitting {} messages of {} bytes over {} clients", o.messages, o.size, o.clients);
    let start = Instant::now();
    // Poll for the full count while the load runs; the deadline bounds both.
    let poll = tokio::spawn(wait_inbox(imap, o.messages as u64, start, last.clone(), cx.deadline));
    let load = tokio::time::timeout(
        cx.deadline.saturating_duration_since(Instant::now()),
        submit_load(&sender, o, Arc::new(AtomicU64::new(0)), || {}),
    )
    .await
    .map_err(|_| anyhow!("submission did not finish before the bench's timeout"))??;
    push_load(out, "live_", &load);
    eprintln!(
        "# live: {} accepted in {:.1} s, {} delivered so far",
        load.accepted,
        load.elapsed.as_secs_f64(),
        last.load(Ordering::Relaxed)
    );
    let waited = if load.accepted == o.messages as u64 {
        with_progress("live", last.clone(), load.accepted, poll).await.context("IMAP poller")?
    } else {
        poll.abort();
        Err(anyhow!("only {} of {} accepted", load.accepted, o.messages))
    };
    let cpu1 = proc_cpu(spid);
    let rcpu1 = proc_cpu(rpid);
    match &waited {
        Ok(at) => {
            out.push(format!("live_deliver_s={}", secs(*at)));
            out.push(format!("live_delivered_msgs_per_s={}", rate(load.accepted, *at)));
            out.push(format!("live_backlog_drain_s={}", secs(at.saturating_sub(load.elapsed))));
        }
        Err(e) => {
            eprintln!("# live: delivery incomplete: {e:#}");
            out.push(format!("live_delivered={}", last.load(Ordering::Relaxed)));
            out.push("live_delivered_msgs_per_s=n/a".into());
        }
    }
    out.push(format!("live_sender_peak_rss_mib={}", mib(proc_status_kib(spid, "VmHWM"))));
    out.push(format!("live_receiver_peak_rss_mib={}", mib(proc_status_kib(rpid, "VmHWM"))));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        out.push(format!("live_sender_cpu_s={:.2}", b.saturating_sub(a).as_secs_f64()));
    }
    if let (Some(a), Some(b)) = (rcpu0, rcpu1) {
        out.push(format!("live_receiver_cpu_s={:.2}", b.saturating_sub(a).as_secs_f64()));
    }
    push_log_facts(out, "live_", &sender);
    out.push(format!("live_receiver_smtp_connections={}", receiver.log_text().matches("smtp connected").count()));
    push_problems(out, "live_", "sender", &sender);
    push_problems(out, "live_", "receiver", &receiver);
    let s = sender.stop().await;
    let r = receiver.stop().await;
    out.push(format!("live_clean_shutdown={}", s.is_ok() && r.is_ok()));
    waited.map(|_| ())
}

async fn run(o: Opts) -> Result<()> {
    let deadline = Instant::now() + o.timeout;
    let bin = postern_bin()?;
    let base = bench_base(&o.dir, "postern-queue-bench-")?;
    let hash = hash_password(&bin).await?;
    let flush = has_queue_flush(&bin).await;
    let dns = dns::TestDns::start(ZONE);

    let mut out = vec![
        "bench=queue".to_string(),
        format!("date={}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        format!("host_cpu={}", cpu_model()),
        format!("host_cores={}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        format!("loadavg_1m_at_start={}", loadavg()),
        format!("postern_bin={}", bin.display()),
        format!("postern_bin_blake3={}", file_digest(&bin)),
        format!("clients={}", o.clients),
        format!("messages={}", o.messages),
        format!("size_bytes={}", o.size),
        format!("sender_max_connections_per_domain={}", o.per_domain.unwrap_or(DEFAULT_PER_DOMAIN)),
        format!("queue_flush_available={flush}"),
        format!("sender_extra={}", o.sender_extra.replace('\n', "\\n")),
    ];
    let cx = Ctx { bin: &bin, hash: &hash, base: base.path(), dns: dns.addr(), flush, deadline };
    let mut failed = None;
    for &phase in &o.phases {
        let (name, r) = match phase {
            Phase::Queued => ("queued", phase_queued(&cx, &o, &mut out).await),
            Phase::Live => ("live", phase_live(&cx, &o, &mut out).await),
        };
        if let Err(e) = r {
            eprintln!("# phase {name}: failed: {e:#}");
            out.push(format!("{name}.failed={}", format!("{e:#}").replace('\n', " ")));
            failed = Some(e);
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    finish("postern queue throughput benchmark", &out, base, o.keep, "configs, logs and data of every node", failed)
}

fn main() -> ExitCode {
    bench_main(parse_opts, |o| o.timeout, run)
}
