//! Helpers shared by the bench targets (each bench includes this file with `mod common;`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

pub const PASSWORD: &str = "bench-password-1";

// ---------------------------------------------------------------------------------------------
// Options from the environment

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().map_err(|_| anyhow!("{name}={v}: not a valid value")),
        _ => Ok(default),
    }
}

pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false" && v != "no")
}

// ---------------------------------------------------------------------------------------------
// Host facts from /proc

pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    line[key.len() + 1..].split_whitespace().next()?.parse().ok()
}

/// Resets VmHWM to the current RSS (needs the right to write clear_refs, which root has).
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User + system CPU time a process has used.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn dir_bytes(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

pub fn file_digest(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => blake3::hash(&bytes).to_hex()[..16].to_string(),
        Err(_) => "unknown".into(),
    }
}

pub fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "n/a".into())
}

pub fn rate(n: u64, d: Duration) -> String {
    if d.is_zero() {
        return "n/a".into();
    }
    format!("{:.0}", n as f64 / d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// TLS: trust exactly the self-signed certificate a node generated for its hostname

pub fn tls_connector(data_dir: &Path) -> Result<TlsConnector> {
    let pem = data_dir.join("tls/self-signed.pem");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&pem).with_context(|| format!("opening {}", pem.display()))?,
    )) {
        roots.add(cert.context("reading the node's certificate")?).context("trusting the node's certificate")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

// ---------------------------------------------------------------------------------------------
// Nodes

pub async fn hash_password(bin: &Path) -> Result<String> {
    let mut child = Command::new(bin)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(format!("{PASSWORD}\n").as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !hash.starts_with("$argon2") {
        bail!("postern hash-password failed ({}): {hash}", out.status);
    }
    Ok(hash)
}

/// Starts `postern serve --config <config> --node <name>` with stderr going to `stderr` and waits
/// for `postern ready`; returns the child, its pid and the addresses it printed it listens on.
/// `who` names the node in the error when it does not become ready.
pub async fn spawn_serve(
    bin: &Path,
    config: &Path,
    name: &str,
    log: &Path,
    stderr: std::fs::File,
    who: &str,
) -> Result<(Child, u32, Vec<(String, SocketAddr)>)> {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--config").arg(config).args(["--node", name]);
    // SAFETY: prctl is async-signal-safe; it makes the node die with the bench, even when the
    // bench itself is killed (Ctrl-C, a timeout), so no node outlives a run.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} serve", bin.display()))?;
    let pid = child.id().ok_or_else(|| anyhow!("the node exited at once"))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut listening = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(l) = postern::server::parse_listening_line(&line) {
                listening.push(l);
            } else if line.starts_with("postern ready") {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    if !matches!(ready, Ok(Ok(true))) {
        let _ = child.start_kill();
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{who} did not become ready; its log:\n{tail}");
    }
    // Keep draining stdout so the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, pid, listening))
}

/// SIGTERM to a node, then waits up to 20 s for a clean exit (kills it after that).
pub async fn stop_child(child: &mut Child, pid: u32) -> Result<()> {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => bail!("the node exited with {st} on SIGTERM"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let _ = child.kill().await;
            bail!("the node did not stop within 20 s of SIGTERM; killed")
        }
    }
}

/// WARN and ERROR lines of a node's log text, less the expected self-signed certificate warning.
pub fn log_problems(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("self-signed"))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// IMAP: count an INBOX

pub struct Imap {
    io: BufReader<Box<dyn Io>>,
    tag: u32,
}

impl Imap {
    pub async fn connect(addr: SocketAddr, tls: &TlsConnector, host: ServerName<'static>, user: &str) -> Result<Imap> {
        let tcp = TcpStream::connect(addr).await?;
        let stream = tls.connect(host, tcp).await.context("IMAP TLS handshake")?;
        let mut imap = Imap { io: BufReader::new(Box::new(stream) as Box<dyn Io>), tag: 0 };
        let greeting = imap.line().await?;
        if !greeting.starts_with("* OK") {
            bail!("IMAP greeting: {greeting}");
        }
        imap.command(&format!("LOGIN {user} {PASSWORD}")).await?;
        Ok(imap)
    }

    async fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.io.read_line(&mut s).await? == 0 {
            bail!("IMAP connection closed");
        }
        Ok(s.trim_end().to_string())
    }

    /// Sends one command; returns its untagged lines once it completes with OK.
    pub async fn command(&mut self, cmd: &str) -> Result<Vec<String>> {
        self.tag += 1;
        let tag = format!("b{}", self.tag);
        self.io.get_mut().write_all(format!("{tag} {cmd}\r\n").as_bytes()).await?;
        self.io.get_mut().flush().await?;
        let mut untagged = Vec::new();
        loop {
            let line = self.line().await?;
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                if rest.starts_with("OK") {
                    return Ok(untagged);
                }
                bail!("IMAP {cmd}: {line}");
            }
            untagged.push(line);
        }
    }

    pub async fn inbox_count(&mut self) -> Result<u64> {
        let lines = self.command("STATUS INBOX (MESSAGES)").await?;
        for l in &lines {
            if let Some(i) = l.find("MESSAGES ") {
                let n: String = l[i + 9..].chars().take_while(char::is_ascii_digit).collect();
                return n.parse().context("STATUS MESSAGES count");
            }
        }
        bail!("no MESSAGES in the STATUS reply: {lines:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP client pieces

/// The payload: `size` bytes of CRLF-ended text lines cycling through `text`, none starting with
/// a dot.
pub fn payload(size: usize, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 2);
    let mut i = 0;
    while out.len() + 2 <= size {
        let line = (size - out.len() - 2).min(76);
        for _ in 0..line {
            out.push(text[i % text.len()]);
            i += 1;
        }
        out.extend_from_slice(b"\r\n");
    }
    if out.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub async fn read_reply(io: &mut BufReader<Box<dyn Io>>) -> Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            bail!("connection closed by the server");
        }
        let code =
            line.get(..3).and_then(|c| c.parse::<u16>().ok()).ok_or_else(|| anyhow!("bad SMTP reply {line:?}"))?;
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text.trim_end().to_string()));
        }
    }
}

pub async fn expect(io: &mut BufReader<Box<dyn Io>>, code: u16, what: &str) -> Result<String> {
    let (c, text) = read_reply(io).await?;
    if c != code {
        bail!("{what}: expected {code}, got {text}");
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Running a bench

/// A fresh directory named `prefix…` below `dir` (default: Cargo's bench tmp dir).
pub fn bench_base(dir: &Option<PathBuf>, prefix: &str) -> Result<tempfile::TempDir> {
    let base_parent = match dir {
        Some(d) => d.clone(),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    std::fs::create_dir_all(&base_parent)?;
    Ok(tempfile::Builder::new().prefix(prefix).tempdir_in(&base_parent)?)
}

/// Prints the results between `title` and `===== end =====`, keeps `base` when asked or after a
/// failure (`kept` says what it holds) and returns the failure.
pub fn finish(
    title: &str,
    out: &[String],
    base: tempfile::TempDir,
    keep: bool,
    kept: &str,
    failed: Option<anyhow::Error>,
) -> Result<()> {
    println!("===== {title} =====");
    for l in out {
        println!("{l}");
    }
    println!("===== end =====");
    if keep || failed.is_some() {
        let path = base.keep();
        eprintln!("# kept {} ({kept})", path.display());
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `main` of a bench: parses the options, runs `run` on a multi-threaded runtime with
/// `timeout` plus a minute as the backstop (the deadline is enforced inside `run` too).
pub fn bench_main<O, F>(
    parse: impl FnOnce() -> Result<Option<O>>,
    timeout: impl FnOnce(&O) -> Duration,
    run: impl FnOnce(O) -> F,
) -> ExitCode
where
    F: std::future::Future<Output = Result<()>>,
{
    let opts = match parse() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = timeout(&opts) + Duration::from_secs(60);
    match runtime.block_on(async { tokio::time::timeout(limit, run(opts)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("bench timed out");
            ExitCode::FAILURE
        }
    }
}
