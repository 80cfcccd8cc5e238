//! SMTP delivery benchmark: N concurrent clients deliver M messages of S bytes to a fresh
//! primary node that acknowledges each one only once it is durable, then the bench waits until
//! IMAP `STATUS INBOX (MESSAGES)` shows them all.
//!
//! Two phases, each against a node of its own (fresh data directory):
//! - `rust`: N tokio clients, one connection each, MAIL/RCPT/DATA pipelined in a loop with no
//!   RSET; latency is timed from writing the final `.\r\n` to reading the 250.
//! - `smtp-source`: Postfix's load generator with the same N/M/S (one connection per message, as
//!   smtp-source does by default), so the figure compares with other MTAs under the same load.
//!
//! Run: `cargo bench --bench smtp -- [-s CLIENTS] [-m MESSAGES] [-l SIZE] [--phase rust|smtp-source|all]
//! [--starttls] [--timeout SECS] [--settle SECS] [--dir PATH] [--keep] [--stall SECS] [--gdb-on-stall]`;
//! every option also reads an environment variable (BENCH_CLIENTS, BENCH_MESSAGES, BENCH_SIZE,
//! BENCH_PHASE, BENCH_STARTTLS, BENCH_TIMEOUT, BENCH_SETTLE, BENCH_DIR, BENCH_KEEP, BENCH_STALL,
//! BENCH_GDB_ON_STALL). POSTERN_BIN picks the server binary, SMTP_SOURCE the smtp-source binary.
//! A phase with no reply and no new mailbox message for `--stall` seconds is ended and reported as
//! stalled. Results go to stdout as `key=value` lines; progress goes to stderr as lines starting
//! with `#`. See docs/benchmarks.md.

mod common;
#[allow(dead_code)]
#[path = "../tests/common/dns.rs"]
mod dns;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

use common::*;

const DOMAIN: &str = "example.test";
const HOSTNAME: &str = "mail.example.test";
const USER: &str = "alice@example.test";
const SENDER: &str = "bench@peer.test";
/// The text the payload's lines cycle through.
const PAYLOAD_TEXT: &[u8] =
    b"Postern delivery benchmark payload: the quick brown fox jumps over the lazy dog 0123456789 ";
/// How often the mailbox is polled while a phase runs.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long the mailbox may lag behind the last acknowledgement before the bench gives up.
const READABLE_GRACE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rust,
    SmtpSource,
}

impl Phase {
    fn key(self) -> &'static str {
        match self {
            Phase::Rust => "rust",
            Phase::SmtpSource => "smtp_source",
        }
    }
}

struct Opts {
    clients: usize,
    messages: usize,
    size: usize,
    phases: Vec<Phase>,
    starttls: bool,
    timeout: Duration,
    settle: Duration,
    dir: Option<PathBuf>,
    keep: bool,
    stall: Duration,
    gdb_on_stall: bool,
}

const USAGE: &str = "usage: cargo bench --bench smtp -- [-s|--clients N] [-m|--messages M] [-l|--size BYTES] \
[--phase rust|smtp-source|all] [--starttls] [--timeout SECS] [--settle SECS] [--dir PATH] [--keep] [--stall SECS] \
[--gdb-on-stall]";

fn parse_phases(s: &str) -> Result<Vec<Phase>> {
    match s {
        "all" => Ok(vec![Phase::Rust, Phase::SmtpSource]),
        "rust" => Ok(vec![Phase::Rust]),
        "smtp-source" | "smtp_source" | "source" => Ok(vec![Phase::SmtpSource]),
        _ => bail!("--phase {s}: expected rust, smtp-source or all"),
    }
}

fn parse_opts() -> Result<Option<Opts>> {
    let mut o = Opts {
        clients: env_or("BENCH_CLIENTS", 32)?,
        messages: env_or("BENCH_MESSAGES", 10_000)?,
        size: env_or("BENCH_SIZE", 10_240)?,
        phases: parse_phases(&env_or("BENCH_PHASE", "all".to_string())?)?,
        starttls: env_flag("BENCH_STARTTLS"),
        timeout: Duration::from_secs(env_or("BENCH_TIMEOUT", 900)?),
        settle: Duration::from_secs_f64(env_or("BENCH_SETTLE", 2.0)?),
        dir: std::env::var_os("BENCH_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        keep: env_flag("BENCH_KEEP"),
        stall: Duration::from_secs(env_or("BENCH_STALL", 30)?),
        gdb_on_stall: env_flag("BENCH_GDB_ON_STALL"),
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
            "--starttls" => o.starttls = true,
            "--timeout" => o.timeout = Duration::from_secs(num("--timeout", value("--timeout")?)? as u64),
            "--settle" => {
                let v = value("--settle")?;
                o.settle = Duration::from_secs_f64(v.parse().map_err(|_| anyhow!("--settle {v}: not a number"))?);
            }
            "--dir" => o.dir = Some(PathBuf::from(value("--dir")?)),
            "--keep" => o.keep = true,
            "--stall" => o.stall = Duration::from_secs(num("--stall", value("--stall")?)? as u64),
            "--gdb-on-stall" => o.gdb_on_stall = true,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if o.clients == 0 || o.messages == 0 {
        bail!("clients and messages must be at least 1");
    }
    if o.clients > 5000 {
        bail!("at most 5000 clients");
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// Host facts from /proc

/// Whole-machine CPU counters: (busy, iowait, total) jiffies.
fn host_cpu() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is already in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0);
    let iowait = v.get(4).copied().unwrap_or(0);
    Some((total - idle - iowait, iowait, total))
}

/// Filesystem type of the mount holding `path`.
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !path.starts_with(f[1]) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| f[1].len() > *len) {
            best = Some((f[1].len(), f[2].to_string()));
        }
    }
    best.map(|(_, t)| t).unwrap_or_else(|| "unknown".into())
}

fn file_mtime(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|t| chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// TLS: trust exactly the self-signed certificate the node generated for HOSTNAME

fn server_name() -> ServerName<'static> {
    ServerName::try_from(HOSTNAME).expect("valid DNS name")
}

// ---------------------------------------------------------------------------------------------
// The node under test

struct Node {
    child: Child,
    pid: u32,
    smtp: SocketAddr,
    imaps: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
}

fn postern_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("POSTERN_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // Cargo builds the binary (same profile as --release) before it runs a bench.
    let built = PathBuf::from(env!("CARGO_BIN_EXE_postern"));
    if !built.exists() {
        eprintln!("# {} is missing: running cargo build --release --bin postern", built.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "--bin", "postern"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release --bin postern failed: {status}");
        }
    }
    Ok(built)
}

/// The node asks an in-process DNS (empty zone: every sender domain has no SPF/DMARC, answered
/// at once), so its inbound checks run as with a local resolver, independent of the machine's.
async fn start_node(bin: &Path, hash: &str, dir: &Path, clients: usize, dns: SocketAddr) -> Result<Node> {
    let data_dir = dir.join("data");
    let config = dir.join("postern.toml");
    let log = dir.join("postern.log");
    let per_ip = (clients + 16).max(200);
    let text = format!(
        r#"[cluster]
domains = ["{DOMAIN}"]

[nodes.bench]
hostname = "{HOSTNAME}"
data_dir = "{data}"
listen.smtp = ["127.0.0.1:0"]
listen.imaps = ["127.0.0.1:0"]

[users."{USER}"]
password = "{hash}"

[smtp]
# the load generator connects from one IP
max_connections_per_ip = {per_ip}
max_connections = {total}

[dns]
nameservers = ["{dns}"]
timeout = "2s"
"#,
        data = data_dir.display(),
        total = per_ip.max(1000),
    );
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let stderr = std::fs::File::create(&log)?;
    let (child, pid, listening) = spawn_serve(bin, &config, "bench", &log, stderr, "the node").await?;
    let (mut smtp, mut imaps) = (None, None);
    for (proto, addr) in listening {
        match proto.as_str() {
            "smtp" => smtp = Some(addr),
            "imaps" => imaps = Some(addr),
            _ => {}
        }
    }
    let (Some(smtp), Some(imaps)) = (smtp, imaps) else { bail!("the node printed no smtp or imaps address") };
    Ok(Node { child, pid, smtp, imaps, data_dir, log })
}

impl Node {
    async fn stop(mut self) -> Result<()> {
        stop_child(&mut self.child, self.pid).await
    }

    /// Ends the node at once (after a failure) and reaps it.
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// WARN and ERROR lines of the node's log, less the expected self-signed certificate warning.
    fn log_problems(&self) -> Vec<String> {
        log_problems(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

// ---------------------------------------------------------------------------------------------
// IMAP: count the INBOX

/// Polls the INBOX until it holds `target` messages (target stays u64::MAX until the load is
/// over and the bench knows how many to expect). Returns when it got there, from `start`.
async fn poll_inbox(mut imap: Imap, start: Instant, target: Arc<AtomicU64>, last: Arc<AtomicU64>) -> Result<Duration> {
    loop {
        let n = imap.inbox_count().await?;
        let at = start.elapsed();
        last.store(n, Ordering::Relaxed);
        if n >= target.load(Ordering::Relaxed) {
            let _ = imap.command("LOGOUT").await;
            return Ok(at);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The Rust load generator

#[derive(Default)]
struct ClientStats {
    latencies: Vec<Duration>,
    accepted: u64,
    rejected: u64,
    errors: Vec<String>,
}

async fn smtp_session(addr: SocketAddr, tls: Option<TlsConnector>) -> Result<BufReader<Box<dyn Io>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut io = BufReader::new(Box::new(tcp) as Box<dyn Io>);
    expect(&mut io, 220, "greeting").await?;
    io.get_mut().write_all(b"EHLO client.peer.test\r\n").await?;
    let ehlo = expect(&mut io, 250, "EHLO").await?;
    let Some(tls) = tls else { return Ok(io) };
    if !ehlo.contains("STARTTLS") {
        bail!("the server does not offer STARTTLS");
    }
    io.get_mut().write_all(b"STARTTLS\r\n").await?;
    expect(&mut io, 220, "STARTTLS").await?;
    if !io.buffer().is_empty() {
        bail!("data after the STARTTLS reply");
    }
    // Nothing is buffered past the 220, so the TLS handshake can take over the raw stream.
    let boxed = io.into_inner();
    let stream = tls.connect(server_name(), boxed).await.context("SMTP TLS handshake")?;
    let mut io = BufReader::new(Box::new(stream) as Box<dyn Io>);
    io.get_mut().write_all(b"EHLO client.peer.test\r\n").await?;
    expect(&mut io, 250, "EHLO after STARTTLS").await?;
    Ok(io)
}

async fn rust_client(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    next: Arc<AtomicUsize>,
    total: usize,
    body: Arc<Vec<u8>>,
    progress: Arc<AtomicU64>,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut io = match smtp_session(addr, tls).await {
        Ok(io) => io,
        Err(e) => {
            stats.errors.push(format!("session setup: {e:#}"));
            return stats;
        }
    };
    let envelope = format!("MAIL FROM:<{SENDER}>\r\nRCPT TO:<{USER}>\r\nDATA\r\n");
    let result: Result<()> = async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= total {
                break;
            }
            // PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write.
            io.get_mut().write_all(envelope.as_bytes()).await?;
            let (mail, mail_text) = read_reply(&mut io).await?;
            let (rcpt, rcpt_text) = read_reply(&mut io).await?;
            let (data, data_text) = read_reply(&mut io).await?;
            if data != 354 {
                progress.fetch_add(1, Ordering::Relaxed);
                stats.rejected += 1;
                if stats.errors.len() < 5 {
                    stats.errors.push(format!("message {i}: {mail_text} / {rcpt_text} / {data_text}"));
                }
                if mail == 421 || rcpt == 421 || data == 421 {
                    bail!("server closing: {data_text}");
                }
                continue;
            }
            let headers = format!(
                "From: <{SENDER}>\r\nTo: <{USER}>\r\nSubject: bench {i}\r\nMessage-ID: <bench.{i}@peer.test>\r\n\
                 Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
            );
            io.get_mut().write_all(headers.as_bytes()).await?;
            io.get_mut().write_all(&body).await?;
            let t0 = Instant::now();
            io.get_mut().write_all(b".\r\n").await?;
            let (code, text) = read_reply(&mut io).await?;
            let dt = t0.elapsed();
            progress.fetch_add(1, Ordering::Relaxed);
            if code == 250 {
                stats.accepted += 1;
                stats.latencies.push(dt);
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
    elapsed: Duration,
    accepted: u64,
    rejected: u64,
    errors: Vec<String>,
    latencies: Vec<Duration>,
    note: Option<String>,
}

async fn rust_load(addr: SocketAddr, data_dir: &Path, o: &Opts, progress: Arc<AtomicU64>) -> Result<LoadResult> {
    let tls = if o.starttls { Some(tls_connector(data_dir)?) } else { None };
    let body = Arc::new(payload(o.size, PAYLOAD_TEXT));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..o.clients.min(o.messages))
        .map(|_| tokio::spawn(rust_client(addr, tls.clone(), next.clone(), o.messages, body.clone(), progress.clone())))
        .collect();
    let mut r = LoadResult {
        elapsed: Duration::ZERO,
        accepted: 0,
        rejected: 0,
        errors: Vec::new(),
        latencies: Vec::with_capacity(o.messages),
        note: None,
    };
    for t in tasks {
        let s = t.await.context("client task")?;
        r.accepted += s.accepted;
        r.rejected += s.rejected;
        r.errors.extend(s.errors);
        r.latencies.extend(s.latencies);
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// smtp-source

fn find_smtp_source() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMTP_SOURCE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("smtp-source"))
        .find(|p| p.is_file())
}

async fn smtp_source_load(bin: &Path, addr: SocketAddr, o: &Opts, deadline: Instant) -> Result<LoadResult> {
    let args = [
        "-s".to_string(),
        o.clients.to_string(),
        "-m".into(),
        o.messages.to_string(),
        "-l".into(),
        o.size.to_string(),
        "-f".into(),
        SENDER.into(),
        "-t".into(),
        USER.into(),
        addr.to_string(),
    ];
    eprintln!("# {} {}", bin.display(), args.join(" "));
    let start = Instant::now();
    let child = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("smtp-source did not finish before the bench's timeout"))??;
    let elapsed = start.elapsed();
    let mut errors = Vec::new();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        errors.push(format!("smtp-source exited with {}: {}", out.status, text.trim()));
    } else if !text.trim().is_empty() {
        errors.extend(text.lines().take(5).map(str::to_string));
    }
    // smtp-source aborts on the first unexpected reply, so a clean exit means every message got its 250.
    let accepted = if out.status.success() { o.messages as u64 } else { 0 };
    Ok(LoadResult {
        elapsed,
        accepted,
        rejected: 0,
        errors,
        latencies: Vec::new(),
        note: Some("accepted assumes a clean smtp-source exit; mailbox_messages is the count actually stored".into()),
    })
}

// ---------------------------------------------------------------------------------------------
// Stall detection

/// Returns once none of the counters has moved for `stall`, with when they last moved.
async fn watchdog(counters: [Arc<AtomicU64>; 2], stall: Duration) -> Instant {
    let sum = || counters.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let mut seen = sum();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sum();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= stall {
            return since;
        }
    }
}

/// `name:state:wchan` of every thread of a process, for the report on a stall.
fn thread_states(pid: u32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return "unknown".into() };
    let mut states: Vec<String> = rd
        .flatten()
        .map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default().trim().to_string();
            let stat = read("stat");
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).unwrap_or("?");
            format!("{}:{}:{}", read("comm").replace(' ', "_"), state, read("wchan"))
        })
        .collect();
    states.sort();
    states.join(",")
}

/// All threads' backtraces (gdb attaches for a moment), written to `file`.
async fn gdb_backtrace(pid: u32, file: &Path) -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-ex", "set pagination off", "-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("gdb took over 180 s"))?
    .context("running gdb")?;
    std::fs::write(file, &out.stdout)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One phase

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn run_phase(
    phase: Phase,
    bin: &Path,
    hash: &str,
    base: &Path,
    o: &Opts,
    deadline: Instant,
    out: &mut Vec<String>,
) -> Result<()> {
    let p = phase.key();
    let source = match phase {
        Phase::SmtpSource => match find_smtp_source() {
            Some(s) => Some(s),
            None => {
                eprintln!("# smtp-source not found: skipping that phase (apt-get install postfix provides it)");
                out.push(format!("{p}.skipped=smtp-source-not-installed"));
                return Ok(());
            }
        },
        Phase::Rust => None,
    };
    let dir = base.join(p);
    std::fs::create_dir_all(&dir)?;
    eprintln!("# phase {p}: starting a node in {}", dir.display());
    let test_dns = dns::TestDns::start("");
    let node = start_node(bin, hash, &dir, o.clients, test_dns.addr()).await?;
    let pid = node.pid;
    tokio::time::sleep(o.settle).await;
    let idle_rss = proc_status_kib(pid, "VmRSS");
    eprintln!("# phase {p}: node pid {pid} smtp {} imaps {} idle RSS {} MiB", node.smtp, node.imaps, mib(idle_rss));

    let tls = tls_connector(&node.data_dir)?;
    let mut imap = Imap::connect(node.imaps, &tls, server_name(), USER).await.context("IMAP login")?;
    let baseline = imap.inbox_count().await?;
    let peak_reset = reset_peak_rss(pid);
    let cpu0 = proc_cpu(pid);
    let self0 = proc_cpu(std::process::id());
    let host0 = host_cpu();

    let target = Arc::new(AtomicU64::new(u64::MAX));
    let last = Arc::new(AtomicU64::new(baseline));
    let start = Instant::now();
    let mut poller = tokio::spawn(poll_inbox(imap, start, target.clone(), last.clone()));
    // Sample RSS as well, in case VmHWM could not be reset.
    let sampled_peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = sampled_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(k) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(k, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    eprintln!("# phase {p}: {} clients, {} messages of {} bytes", o.clients, o.messages, o.size);
    let progress = Arc::new(AtomicU64::new(0));
    let load = async {
        match &source {
            None => tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                rust_load(node.smtp, &node.data_dir, o, progress.clone()),
            )
            .await
            .map_err(|_| anyhow!("the load did not finish before the bench's timeout"))?,
            Some(s) => smtp_source_load(s, node.smtp, o, deadline).await,
        }
    };
    let load: Result<LoadResult> = tokio::select! {
        r = load => r,
        last_progress = watchdog([progress.clone(), last.clone()], o.stall) => {
            poller.abort();
            sampler.abort();
            let acked = progress.load(Ordering::Relaxed);
            let stored = last.load(Ordering::Relaxed).saturating_sub(baseline);
            let threads = thread_states(pid);
            let replies = if phase == Phase::Rust { acked.to_string() } else { "unknown".into() };
            let stalled_at = last_progress.saturating_duration_since(start).as_secs_f64();
            eprintln!(
                "# phase {p}: STALLED: no progress since {stalled_at:.1} s into the load; {replies} final replies, \
                 mailbox {stored}; server threads: {threads}"
            );
            out.push(format!("{p}.stalled_after_s={stalled_at:.1}"));
            out.push(format!("{p}.final_replies_before_stall={replies}"));
            out.push(format!("{p}.mailbox_messages_at_stall={stored}"));
            out.push(format!("{p}.server_threads_at_stall={threads}"));
            out.push(format!("{p}.server_cpu_s_at_stall={:.2}", proc_cpu(pid).unwrap_or_default().as_secs_f64()));
            if o.gdb_on_stall {
                let file = dir.join("stall-backtrace.txt");
                match gdb_backtrace(pid, &file).await {
                    Ok(()) => eprintln!("# phase {p}: server backtraces in {}", file.display()),
                    Err(e) => eprintln!("# phase {p}: no backtrace: {e:#}"),
                }
            }
            eprintln!("# phase {p}: server log {}", node.log.display());
            Err(anyhow!(
                "server stalled: no reply and no new mailbox message for {:?} ({stored} of {} stored)",
                o.stall,
                o.messages
            ))
        }
    };
    let load = match load {
        Ok(l) => l,
        Err(e) => {
            poller.abort();
            sampler.abort();
            node.kill().await;
            return Err(e);
        }
    };
    let host1 = host_cpu();
    target.store(baseline + load.accepted, Ordering::Relaxed);
    let grace = READABLE_GRACE.min(deadline.saturating_duration_since(Instant::now()));
    let readable = match tokio::time::timeout(grace, &mut poller).await {
        Ok(Ok(Ok(at))) => Some(at),
        Ok(Ok(Err(e))) => {
            eprintln!("# phase {p}: IMAP polling failed: {e:#}");
            None
        }
        Ok(Err(e)) => {
            eprintln!("# phase {p}: IMAP poller: {e}");
            None
        }
        Err(_) => {
            poller.abort();
            eprintln!(
                "# phase {p}: the mailbox did not reach {} messages within {grace:?} (last seen {})",
                baseline + load.accepted,
                last.load(Ordering::Relaxed)
            );
            None
        }
    };
    let cpu1 = proc_cpu(pid);
    let self1 = proc_cpu(std::process::id());
    sampler.abort();
    let peak_hwm = proc_status_kib(pid, "VmHWM");
    let end_rss = proc_status_kib(pid, "VmRSS");
    tokio::time::sleep(o.settle).await;
    let after_rss = proc_status_kib(pid, "VmRSS");

    // The count the mailbox really has (a fresh login, independent of the poller).
    let stored = match Imap::connect(node.imaps, &tls, server_name(), USER).await {
        Ok(mut i) => i.inbox_count().await.ok(),
        Err(_) => None,
    };
    let store_bytes = dir_bytes(&node.data_dir);
    let problems = node.log_problems();
    let log_path = node.log.clone();
    let stop = node.stop().await;

    let mut latencies = load.latencies;
    latencies.sort_unstable();
    let pfx = |k: &str, v: String| format!("{p}.{k}={v}");
    out.push(pfx("clients", o.clients.to_string()));
    out.push(pfx("messages", o.messages.to_string()));
    out.push(pfx("size_bytes", o.size.to_string()));
    out.push(pfx("starttls", (o.starttls && phase == Phase::Rust).to_string()));
    out.push(pfx("accepted", load.accepted.to_string()));
    out.push(pfx("rejected", load.rejected.to_string()));
    out.push(pfx("client_errors", load.errors.len().to_string()));
    out.push(pfx("elapsed_s", format!("{:.3}", load.elapsed.as_secs_f64())));
    out.push(pfx("accepted_msgs_per_s", rate(load.accepted, load.elapsed)));
    if phase == Phase::Rust {
        out.push(pfx("latency_p50_ms", ms(percentile(&latencies, 0.50))));
        out.push(pfx("latency_p90_ms", ms(percentile(&latencies, 0.90))));
        out.push(pfx("latency_p99_ms", ms(percentile(&latencies, 0.99))));
        out.push(pfx("latency_max_ms", ms(latencies.last().copied().unwrap_or_default())));
        let mean = latencies.iter().sum::<Duration>().checked_div(latencies.len().max(1) as u32).unwrap_or_default();
        out.push(pfx("latency_mean_ms", ms(mean)));
    }
    match readable {
        Some(at) => {
            out.push(pfx("readable_s", format!("{:.3}", at.as_secs_f64())));
            out.push(pfx("end_to_end_msgs_per_s", rate(load.accepted, at)));
        }
        None => {
            out.push(pfx("readable_s", "never".into()));
            out.push(pfx("end_to_end_msgs_per_s", "n/a".into()));
        }
    }
    let mailbox = stored.map(|n| n.saturating_sub(baseline));
    out.push(pfx("mailbox_messages", mailbox.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into())));
    out.push(pfx("idle_rss_mib", mib(idle_rss)));
    let peak = if peak_reset { peak_hwm } else { Some(sampled_peak.load(Ordering::Relaxed)).filter(|k| *k > 0) };
    out.push(pfx("peak_rss_mib", mib(peak)));
    out.push(pfx("peak_rss_source", if peak_reset { "VmHWM" } else { "sampled-VmRSS" }.into()));
    out.push(pfx("end_rss_mib", mib(end_rss)));
    out.push(pfx("after_settle_rss_mib", mib(after_rss)));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let cpu = b.saturating_sub(a);
        out.push(pfx("server_cpu_s", format!("{:.2}", cpu.as_secs_f64())));
        if load.accepted > 0 {
            out.push(pfx("server_cpu_ms_per_msg", format!("{:.3}", cpu.as_secs_f64() * 1000.0 / load.accepted as f64)));
        }
    }
    if let (Phase::Rust, Some(a), Some(b)) = (phase, self0, self1) {
        out.push(pfx("loadgen_cpu_s", format!("{:.2}", b.saturating_sub(a).as_secs_f64())));
    }
    if let (Some(a), Some(b)) = (host0, host1) {
        let total = (b.2 - a.2).max(1) as f64;
        out.push(pfx("host_cpu_busy_pct", format!("{:.0}", (b.0 - a.0) as f64 * 100.0 / total)));
        out.push(pfx("host_iowait_pct", format!("{:.1}", (b.1 - a.1) as f64 * 100.0 / total)));
    }
    out.push(pfx("store_bytes", store_bytes.to_string()));
    out.push(pfx("server_log_problems", problems.len().to_string()));
    out.push(pfx("clean_shutdown", stop.is_ok().to_string()));
    if let Some(n) = &load.note {
        eprintln!("# phase {p}: {n}");
    }
    for e in load.errors.iter().take(10) {
        eprintln!("# phase {p} client error: {e}");
    }
    for l in problems.iter().take(10) {
        eprintln!("# phase {p} server log: {l}");
    }
    if let Err(e) = stop {
        eprintln!("# phase {p}: {e:#}");
    }
    if o.keep {
        eprintln!("# phase {p}: kept {} (log {})", dir.display(), log_path.display());
    }
    Ok(())
}

async fn run(o: Opts) -> Result<()> {
    let deadline = Instant::now() + o.timeout;
    let bin = postern_bin()?;
    let base = bench_base(&o.dir, "postern-smtp-bench-")?;
    let hash = hash_password(&bin).await?;

    let mut out = vec![
        "bench=smtp".to_string(),
        format!("date={}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        format!("host_cpu={}", cpu_model()),
        format!("host_cores={}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        format!("kernel={}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()),
        format!("data_fs={}", fs_type(base.path())),
        // Other work on the machine skews the figures: load average when the bench started.
        format!("loadavg_1m_at_start={}", loadavg()),
        format!("postern_bin={}", bin.display()),
        // Which build ran: others rebuild target/release/postern, so name it by content and time.
        format!("postern_bin_blake3={}", file_digest(&bin)),
        format!("postern_bin_mtime={}", file_mtime(&bin)),
    ];
    let mut failed = None;
    for &phase in &o.phases {
        if let Err(e) = run_phase(phase, &bin, &hash, base.path(), &o, deadline, &mut out).await {
            eprintln!("# phase {}: failed: {e:#}", phase.key());
            out.push(format!("{}.failed={}", phase.key(), format!("{e:#}").replace('\n', " ")));
            failed = Some(e);
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    finish("postern smtp delivery benchmark", &out, base, o.keep, "logs and data of every phase", failed)
}

fn main() -> ExitCode {
    // The deadline is enforced inside run() too; the timeout is the backstop (plus time to stop nodes).
    bench_main(parse_opts, |o| o.timeout, run)
}
