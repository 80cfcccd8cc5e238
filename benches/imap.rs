//! IMAP benchmark on big mailboxes (issue 3): the bench fills a store directly through the
//! `postern::store` API (far faster than APPEND), starts the real binary on it and times, over
//! IMAPS on 127.0.0.1, with a plain client written here:
//! - `SELECT` of a BIG-message INBOX (default 100,000), and `UID FETCH 1:* (FLAGS)` of it;
//! - `FETCH 1:* (ENVELOPE)` and `SEARCH TEXT` on a MID-message mailbox (default 10,000);
//! - IDLERS clients (default 50) in IDLE on one mailbox: time from an APPEND by another client
//!   until every one of them has seen `* n EXISTS`;
//! - the server's RSS (`/proc/PID/status`) with SESSIONS (default 200) idle authenticated sessions.
//!
//! The last two run on a second, freshly started server, so the RSS is not what the big FETCHes
//! left in sled's cache (that figure is printed too, as `rss_after_commands_mib`).
//! Each command runs once right after the server started ("cold": sled's cache is empty, the OS
//! page cache is not) and then RUNS times (default 5) on one session ("warm", the median is
//! printed). Run: `cargo bench --bench imap`; sizes from the environment: BENCH_BIG, BENCH_MID,
//! BENCH_SESSIONS, BENCH_IDLERS, BENCH_RUNS, plus BENCH_DIR and BENCH_KEEP=1. A quick run:
//! `BENCH_BIG=10000 BENCH_MID=2000 BENCH_SESSIONS=50 cargo bench --bench imap`. POSTERN_BIN picks
//! the server binary. See docs/benchmarks.md.

#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_rustls::TlsConnector;

use common::*;
use postern::store::{Flags, MessageMeta, Store};

const DOMAIN: &str = "example.test";
const HOSTNAME: &str = "mail.example.test";
const USER: &str = "alice@example.test";
/// The word SEARCH TEXT looks for; one message in 100 of the MID mailbox has it.
const NEEDLE: &str = "zebracorn";

struct Opts {
    big: u32,
    mid: u32,
    sessions: usize,
    idlers: usize,
    runs: usize,
    dir: Option<PathBuf>,
    keep: bool,
}

fn parse_opts() -> Result<Option<Opts>> {
    Ok(Some(Opts {
        big: env_or("BENCH_BIG", 100_000)?,
        mid: env_or("BENCH_MID", 10_000)?,
        sessions: env_or("BENCH_SESSIONS", 200)?,
        idlers: env_or("BENCH_IDLERS", 50)?,
        runs: env_or::<usize>("BENCH_RUNS", 5)?.max(1),
        dir: std::env::var_os("BENCH_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        keep: env_flag("BENCH_KEEP"),
    }))
}

fn postern_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("POSTERN_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_postern"));
    if !built.exists() {
        bail!("{} is missing: run cargo build --release --bin postern", built.display());
    }
    Ok(built)
}

// ---------------------------------------------------------------------------------------------
// Filling the store

/// A small plain-text message; `needle` puts NEEDLE in its body.
fn message(n: u32, needle: bool) -> Vec<u8> {
    let word = if needle { NEEDLE } else { "lorem" };
    format!(
        "From: Sender {n} <sender{n}@peer.test>\r\nTo: Alice <{USER}>\r\nCc: bob@peer.test\r\n\
         Subject: Benchmark message number {n}\r\nDate: Sat, 21 Nov 2026 10:{:02}:{:02} +0000\r\n\
         Message-ID: <bench{n}@peer.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
         Hello Alice,\r\n\r\nthis is message {n} of the IMAP benchmark. The quick brown fox jumps over the\r\n\
         lazy dog, {word} ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n\
         \r\n-- \r\nSender {n}\r\n",
        (n / 60) % 60,
        n % 60
    )
    .into_bytes()
}

/// Files `count` messages into `mailbox` in batches of one sled batch each. All but the last
/// 1% are \Seen (so `[UNSEEN n]` points near the end), every 10th is \Flagged, every 50th has a
/// keyword.
fn fill(store: &Store, acct: u32, mailbox: &str, count: u32, needles: bool) -> Result<()> {
    let mbox = match store.mailbox_id(acct, mailbox)? {
        Some(id) => id,
        None => store.create_mailbox(acct, mailbox, None)?,
    };
    let keyword = vec!["$Important".to_string()];
    let unseen_from = count - count / 100;
    let mut n = 0;
    while n < count {
        let end = (n + 1000).min(count);
        let mut items = Vec::with_capacity((end - n) as usize);
        for i in n..end {
            let mut w = store.blob_writer()?;
            w.write(&message(i + 1, needles && i % 100 == 7))?;
            let mut flags = if i < unseen_from { Flags::SEEN } else { Flags::default() };
            if i % 10 == 3 {
                flags = flags.union(Flags::FLAGGED);
            }
            let keywords: &[String] = if i % 50 == 1 { &keyword } else { &[] };
            let meta =
                MessageMeta { flags, keywords, internal_date: 1_795_000_000 + i64::from(i), tz_offset_minutes: 60 };
            items.push((w.finish()?, meta));
        }
        store.append_messages(acct, mbox, items)?;
        n = end;
    }
    Ok(())
}

fn populate(data_dir: &Path, o: &Opts) -> Result<()> {
    let store = Store::open(&data_dir.join("store"), "bench", 64 << 20)?;
    let acct = store.ensure_account(USER)?;
    fill(&store, acct, "INBOX", o.big, false)?;
    fill(&store, acct, "Mid", o.mid, true)?;
    store.create_mailbox(acct, "Idle", None)?;
    store.sync_blocking()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The node

struct Node {
    child: Child,
    pid: u32,
    imaps: SocketAddr,
    log: PathBuf,
}

fn write_config(dir: &Path, hash: &str, o: &Opts) -> Result<PathBuf> {
    let config = dir.join("postern.toml");
    let text = format!(
        r#"[cluster]
domains = ["{DOMAIN}"]

[nodes.bench]
hostname = "{HOSTNAME}"
data_dir = "{data}"
listen.imaps = ["127.0.0.1:0"]

[users."{USER}"]
password = "{hash}"

[imap]
# every client of the bench connects from 127.0.0.1
max_connections_per_ip = {per_ip}
"#,
        data = dir.join("data").display(),
        per_ip = o.sessions + o.idlers + 16,
    );
    std::fs::write(&config, text)?;
    Ok(config)
}

async fn start_node(bin: &Path, dir: &Path, config: &Path, run: usize) -> Result<Node> {
    let log = dir.join(format!("postern-{run}.log"));
    let stderr = std::fs::File::create(&log)?;
    let (child, pid, listening) = spawn_serve(bin, config, "bench", &log, stderr, "the node").await?;
    let imaps = listening
        .into_iter()
        .find(|(p, _)| p == "imaps")
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow!("the node printed no imaps address"))?;
    Ok(Node { child, pid, imaps, log })
}

// ---------------------------------------------------------------------------------------------
// A minimal IMAP client: lines, with literals `{n}` read inline

struct Client {
    io: BufReader<Box<dyn Io>>,
    tag: u32,
}

impl Client {
    async fn connect(addr: SocketAddr, tls: &TlsConnector) -> Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let host = ServerName::try_from(HOSTNAME).expect("valid DNS name");
        let stream = tls.connect(host, tcp).await.context("IMAP TLS handshake")?;
        let mut c = Client { io: BufReader::with_capacity(256 * 1024, Box::new(stream) as Box<dyn Io>), tag: 0 };
        let greeting = c.line().await?;
        if !greeting.starts_with(b"* OK") {
            bail!("IMAP greeting: {}", String::from_utf8_lossy(&greeting));
        }
        c.command(&format!("LOGIN {USER} {PASSWORD}")).await?;
        Ok(c)
    }

    /// One response line without its CRLF; a literal it announces is read into it.
    async fn line(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            if self.io.read_until(b'\n', &mut out).await? == 0 {
                bail!("IMAP connection closed");
            }
            while out.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                out.pop();
            }
            let Some(len) = literal_len(&out) else { return Ok(out) };
            let start = out.len();
            out.resize(start + len, 0);
            self.io.read_exact(&mut out[start..]).await?;
        }
    }

    async fn send(&mut self, cmd: &str) -> Result<String> {
        self.tag += 1;
        let tag = format!("b{}", self.tag);
        self.io.get_mut().write_all(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        self.io.get_mut().flush().await?;
        Ok(tag)
    }

    /// Reads up to the tagged reply; returns the untagged lines once it is OK.
    async fn finish(&mut self, tag: &str, cmd: &str) -> Result<Vec<Vec<u8>>> {
        let mut untagged = Vec::new();
        let prefix = format!("{tag} ");
        loop {
            let line = self.line().await?;
            if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
                if rest.starts_with(b"OK") {
                    return Ok(untagged);
                }
                bail!("IMAP {cmd}: {}", String::from_utf8_lossy(&line));
            }
            untagged.push(line);
        }
    }

    async fn command(&mut self, cmd: &str) -> Result<Vec<Vec<u8>>> {
        let tag = self.send(cmd).await?;
        self.finish(&tag, cmd).await
    }

    /// Runs `cmd` and returns how long it took and how many untagged lines it gave.
    async fn timed(&mut self, cmd: &str) -> Result<(Duration, usize)> {
        let start = Instant::now();
        let lines = self.command(cmd).await?;
        Ok((start.elapsed(), lines.len()))
    }
}

fn literal_len(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|b| *b == b'{')?;
    let digits = body[open + 1..].strip_suffix(b"+").unwrap_or(&body[open + 1..]);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn count_prefix(lines: &[Vec<u8>], prefix: &[u8]) -> usize {
    lines.iter().filter(|l| l.starts_with(prefix)).count()
}

// ---------------------------------------------------------------------------------------------
// Measurements

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// One row: cold (first on a fresh server, when given), warm median of `runs`, and what the
/// reply held (so a wrong answer is visible next to its time).
struct Row {
    name: String,
    cold: Option<Duration>,
    warm: Duration,
    lines: usize,
}

async fn measure(c: &mut Client, cmd: &str, runs: usize, cold: Option<Duration>, name: &str) -> Result<Row> {
    let mut times = Vec::with_capacity(runs);
    let mut lines = 0;
    for _ in 0..runs {
        let (d, n) = c.timed(cmd).await?;
        times.push(d);
        lines = n;
    }
    Ok(Row { name: name.to_string(), cold, warm: median(times), lines })
}

/// The cold figures: each command once on a fresh server, in its own session.
async fn cold_pass(node: &Node, tls: &TlsConnector) -> Result<Vec<(String, Duration)>> {
    let mut c = Client::connect(node.imaps, tls).await?;
    let mut out = Vec::new();
    let (d, _) = c.timed("SELECT INBOX").await?;
    out.push(("select_big".to_string(), d));
    let (d, _) = c.timed("UID FETCH 1:* (FLAGS)").await?;
    out.push(("uid_fetch_flags_big".to_string(), d));
    let (d, _) = c.timed("SELECT Mid").await?;
    out.push(("select_mid".to_string(), d));
    let (d, _) = c.timed("FETCH 1:* (ENVELOPE)").await?;
    out.push(("fetch_envelope_mid".to_string(), d));
    let (d, _) = c.timed(&format!("SEARCH TEXT {NEEDLE}")).await?;
    out.push(("search_text_mid".to_string(), d));
    let _ = c.command("LOGOUT").await;
    Ok(out)
}

async fn warm_pass(node: &Node, tls: &TlsConnector, o: &Opts, cold: &[(String, Duration)]) -> Result<Vec<Row>> {
    let cold_of = |k: &str| cold.iter().find(|(n, _)| n == k).map(|(_, d)| *d);
    let mut c = Client::connect(node.imaps, tls).await?;
    let mut rows = Vec::new();
    rows.push(measure(&mut c, "SELECT INBOX", o.runs, cold_of("select_big"), "select_big").await?);
    let fetched = c.command("UID FETCH 1:* (FLAGS)").await?;
    let got = count_prefix(&fetched, b"* ");
    if got != o.big as usize {
        bail!("UID FETCH 1:* (FLAGS) gave {got} lines for {} messages", o.big);
    }
    rows.push(
        measure(&mut c, "UID FETCH 1:* (FLAGS)", o.runs, cold_of("uid_fetch_flags_big"), "uid_fetch_flags_big").await?,
    );
    rows.push(measure(&mut c, "FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)", o.runs, None, "fetch_fast_big").await?);
    rows.push(measure(&mut c, "SELECT Mid", o.runs, cold_of("select_mid"), "select_mid").await?);
    rows.push(
        measure(&mut c, "FETCH 1:* (ENVELOPE)", o.runs, cold_of("fetch_envelope_mid"), "fetch_envelope_mid").await?,
    );
    let search = c.command(&format!("SEARCH TEXT {NEEDLE}")).await?;
    let hits = search.iter().find(|l| l.starts_with(b"* SEARCH")).map_or(0, |l| l.split(|b| *b == b' ').count() - 2);
    let expected = (0..o.mid).filter(|i| i % 100 == 7).count();
    if hits != expected {
        bail!("SEARCH TEXT {NEEDLE} found {hits}, expected {expected}");
    }
    rows.push(
        measure(&mut c, &format!("SEARCH TEXT {NEEDLE}"), o.runs, cold_of("search_text_mid"), "search_text_mid")
            .await?,
    );
    let _ = c.command("LOGOUT").await;
    Ok(rows)
}

/// Opens `n` authenticated sessions (LOGIN only), a few at a time.
async fn open_sessions(node: &Node, tls: &TlsConnector, n: usize) -> Result<Vec<Client>> {
    let mut sessions = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for _ in 0..n {
        let (addr, tls) = (node.imaps, tls.clone());
        pending.push(tokio::spawn(async move { Client::connect(addr, &tls).await }));
        if pending.len() == 8 {
            for h in pending.drain(..) {
                sessions.push(h.await??);
            }
        }
    }
    for h in pending {
        sessions.push(h.await??);
    }
    Ok(sessions)
}

/// IDLE on `Idle` in `idlers` sessions; an APPEND from one more; returns the time until the last
/// idler read `* n EXISTS`, and the median.
async fn idle_fanout(idlers: Vec<Client>, appender: &mut Client) -> Result<(Duration, Duration)> {
    let mut waiting = Vec::new();
    for mut c in idlers {
        c.command("SELECT Idle").await?;
        let tag = c.send("IDLE").await?;
        let cont = c.line().await?;
        if !cont.starts_with(b"+") {
            bail!("IDLE: {}", String::from_utf8_lossy(&cont));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        waiting.push(tokio::spawn(async move {
            let _ = rx.await;
            loop {
                let line = c.line().await?;
                if line.starts_with(b"* ") && line.ends_with(b" EXISTS") {
                    let at = Instant::now();
                    c.io.get_mut().write_all(b"DONE\r\n").await?;
                    c.io.get_mut().flush().await?;
                    c.finish(&tag, "IDLE").await?;
                    return Ok::<Instant, anyhow::Error>(at);
                }
            }
        }));
        // The reader starts at once; the channel only keeps the order visible.
        let _ = tx.send(());
    }
    // Let the server settle every session into its IDLE wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msg = message(0, false);
    let start = Instant::now();
    appender.io.get_mut().write_all(format!("a1 APPEND Idle {{{}+}}\r\n", msg.len()).as_bytes()).await?;
    appender.io.get_mut().write_all(&msg).await?;
    appender.io.get_mut().write_all(b"\r\n").await?;
    appender.io.get_mut().flush().await?;
    let mut seen = Vec::new();
    for h in waiting {
        let at = tokio::time::timeout(Duration::from_secs(30), h).await.context("an idler never saw EXISTS")???;
        seen.push(at.duration_since(start));
    }
    appender.finish("a1", "APPEND").await?;
    let last = *seen.iter().max().unwrap_or(&Duration::ZERO);
    Ok((last, median(seen)))
}

async fn commands(node: &Node, tls: &TlsConnector, o: &Opts, out: &mut Vec<String>) -> Result<()> {
    let cold = cold_pass(node, tls).await?;
    let rows = warm_pass(node, tls, o, &cold).await?;
    out.push(format!("{:<24} {:>10} {:>10} {:>8}", "figure", "cold_ms", "warm_ms", "lines"));
    for r in &rows {
        let cold = r.cold.map_or_else(|| "-".to_string(), ms);
        out.push(format!("{:<24} {:>10} {:>10} {:>8}", r.name, cold, ms(r.warm), r.lines));
    }
    out.push(format!("rss_after_commands_mib={}", mib(proc_status_kib(node.pid, "VmRSS"))));
    Ok(())
}

/// On a freshly started server (so the RSS is the sessions' and not what the big FETCHes left
/// in sled's cache): SESSIONS logins, their RSS, then the IDLE fan-out.
async fn sessions(node: &Node, tls: &TlsConnector, o: &Opts, out: &mut Vec<String>) -> Result<()> {
    let rss_before = proc_status_kib(node.pid, "VmRSS");
    let start = Instant::now();
    let mut sessions = open_sessions(node, tls, o.sessions).await?;
    let login_s = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = proc_status_kib(node.pid, "VmRSS");
    out.push(format!("rss_before_sessions_mib={}", mib(rss_before)));
    out.push(format!("rss_{}_idle_sessions_mib={}", o.sessions, mib(rss)));
    out.push(format!("logins_s={:.1}", login_s.as_secs_f64()));
    let idlers: Vec<Client> = sessions.drain(..o.idlers.min(sessions.len())).collect();
    let mut appender = match sessions.pop() {
        Some(c) => c,
        None => Client::connect(node.imaps, tls).await?,
    };
    let n = idlers.len();
    let (last, med) = idle_fanout(idlers, &mut appender).await?;
    out.push(format!("idle_{n}_all_see_exists_ms={}", ms(last)));
    out.push(format!("idle_{n}_median_ms={}", ms(med)));
    out.push(format!("rss_end_mib={}", mib(proc_status_kib(node.pid, "VmRSS"))));
    Ok(())
}

/// The first SELECT and FETCH after a restart of a server that has used the mailbox before:
/// what a user sees after an upgrade or a reboot (the index starts from its saved snapshot).
async fn after_restart(node: &Node, tls: &TlsConnector, out: &mut Vec<String>) -> Result<()> {
    let mut c = Client::connect(node.imaps, tls).await?;
    let (d, _) = c.timed("SELECT INBOX").await?;
    out.push(format!("select_big_after_restart_ms={}", ms(d)));
    let (d, _) = c.timed("UID FETCH 1:* (FLAGS)").await?;
    out.push(format!("uid_fetch_flags_big_after_restart_ms={}", ms(d)));
    let _ = c.command("LOGOUT").await;
    Ok(())
}

async fn run(o: Opts) -> Result<()> {
    let bin = postern_bin()?;
    let base = bench_base(&o.dir, "postern-imap-bench-")?;
    let hash = hash_password(&bin).await?;
    let mut out = vec![
        "bench=imap".to_string(),
        format!("date={}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        format!("host_cpu={}", cpu_model()),
        format!("loadavg_1m_at_start={}", loadavg()),
        format!("postern_bin_blake3={}", file_digest(&bin)),
        format!("big={} mid={} sessions={} idlers={} runs={}", o.big, o.mid, o.sessions, o.idlers, o.runs),
    ];
    let dir = base.path().to_path_buf();
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let start = Instant::now();
    populate(&data, &o).context("filling the store")?;
    out.push(format!("populate_s={:.1}", start.elapsed().as_secs_f64()));
    eprintln!("# store filled in {:.1} s", start.elapsed().as_secs_f64());
    let config = write_config(&dir, &hash, &o)?;
    let mut failed = None;
    let mut connector = None;
    for (run, part) in ["commands", "sessions", "restart"].into_iter().enumerate() {
        let mut node = start_node(&bin, &dir, &config, run).await?;
        // The node writes its self-signed certificate at its first start.
        let tls = match &connector {
            Some(t) => t,
            None => connector.insert(tls_connector(&data)?),
        };
        let result = match part {
            "commands" => commands(&node, tls, &o, &mut out).await,
            "sessions" => sessions(&node, tls, &o, &mut out).await,
            _ => after_restart(&node, tls, &mut out).await,
        };
        let problems = log_problems(&std::fs::read_to_string(&node.log).unwrap_or_default());
        for l in problems.iter().take(10) {
            eprintln!("# server log ({part}): {l}");
        }
        let stopped = stop_child(&mut node.child, node.pid).await;
        if let Some(e) = result.err().or(stopped.err()) {
            failed = Some(e.context(part));
            break;
        }
    }
    finish("postern imap benchmark", &out, base, o.keep, "config, logs and data", failed)
}

fn main() -> ExitCode {
    bench_main(parse_opts, |_| Duration::from_secs(600), run)
}
